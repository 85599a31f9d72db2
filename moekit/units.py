"""Byte units and the width of one number in each precision: the one home for both.

Every module that turns bytes into GiB or MiB, or asks how many bytes a parameter takes in a
precision, reads it here.
"""

from __future__ import annotations

#: Binary units (what PyTorch's allocator and ``nvidia-smi`` report): 1 GiB = 2**30 bytes.
GiB = 2**30
MiB = 2**20
KiB = 2**10

#: Bytes of one number in each training precision (fp32: 4; fp16 and bf16: 2).
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2}


def width(precision: str) -> int:
    """Bytes of one number in ``precision`` ('fp32', 'fp16' or 'bf16')."""
    return BYTES_PER_ELEMENT[precision]
