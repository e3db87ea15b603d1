"""Adapter groups: which queue shard an adapter's jobs go to.

A group is fixed when the adapter is registered (stored on its row) so that it
can later be moved to balance load; an adapter that is not registered falls
back to the same stable hash, so producers and workers agree without a lookup.
"""
from __future__ import annotations

import hashlib

DEFAULT_NUM_GROUPS = 64


def adapter_group(adapter_id: str, num_groups: int = DEFAULT_NUM_GROUPS) -> str:
    """``g<n>``, n = a stable hash of the id modulo ``num_groups`` (never Python's salted ``hash``)."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    digest = hashlib.sha256(adapter_id.encode()).digest()
    return f"g{int.from_bytes(digest[:8], 'big') % num_groups}"
