"""Helpers shared by the random-access sources."""

from __future__ import annotations


def checked_index(index, size: int) -> int:
    """``index`` as an int in ``[0, size)``; ``IndexError`` otherwise (no negative wrap-around:
    a record index names one deterministic example)."""
    index = int(index)
    if not 0 <= index < size:
        raise IndexError(f"index {index} out of range [0, {size})")
    return index
