"""Sortable ids (UUIDv7, RFC 9562): time-ordered, so `ORDER BY id` is creation order."""

import os
import time
import uuid


def uuid7() -> str:
    """A new UUIDv7 as its canonical 36-character string."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0x0FFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b, 62 bits
    return str(uuid.UUID(int=value))
