"""Datasets the project owns: the `ddnn_digits` TFDS builder (the embedded
default dataset) and ImageFolder roots (tar extraction, listing, hold-out).

`input_pipeline` builds the digits builder directly from its class, so no
import-time registration with TFDS is relied on.
"""
