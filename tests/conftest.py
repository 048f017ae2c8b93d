"""Test-session settings shared by every test module."""

import jax

# The partitionable threefry PRNG (jax's default) makes XLA:CPU compile parameter
# initialisation about 3x slower (16 s instead of 6 s for CIFAR ResNet-20 on two
# cores). No test depends on the particular random stream, and every parameter
# here is replicated, so the tests use the faster-compiling variant.
jax.config.update('jax_threefry_partitionable', False)
