"""Constants and integer helpers the Triton kernels share with their launchers and the
pure-PyTorch references in gapfix.ops. This module imports neither triton nor gapfix, so the
references keep working where Triton is not installed."""

# The BASH mixing decision compares the top MASK_BITS bits of a Philox word with
# round(beta * 2**MASK_BITS): the same integers on every device.
MASK_BITS = 24


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): tl.arange sizes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()
