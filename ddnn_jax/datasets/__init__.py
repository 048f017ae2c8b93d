"""Datasets: the registry of what the input pipeline reads (`sources`: TFDS
datasets and image folders, their sizes and classes, in-memory splits), the
`ddnn_digits` TFDS builder (the embedded default dataset) and ImageFolder roots
(tar extraction, listing, hold-out).

`sources` builds the digits builder directly from its class, so no
import-time registration with TFDS is relied on.
"""
