"""Preallocated page pools, one per tier, with a free list.

A pool owns the storage of its tier's pages and their per-page metadata (fill, positions); see
`skvrt.kv.pages` for the contract. Memory is allocated once, at construction, and never grows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import ContextOverflowError


@dataclasses.dataclass(frozen=True)
class DenseTier:
    """Keys and values stored as they are, in `dtype` (float16 by default; float32 for the reference cache)."""

    dtype: str = "float16"
    name: str = "dense"

    def page_bytes(self, page_size: int, head_dim: int) -> int:
        """Bytes one page really holds: K and V storage plus its metadata (fill + positions)."""
        item = np.dtype(self.dtype).itemsize
        return 2 * page_size * head_dim * item + 4 + 4 * page_size

    def bytes_per_token(self, head_dim: int) -> int:
        """Payload bytes per token per KV head (K and V), metadata excluded."""
        return 2 * head_dim * np.dtype(self.dtype).itemsize


class TierPool:
    """n_pages pages of one tier. Storage: k, v (n_pages, P, D) in the tier's dtype."""

    def __init__(self, tier: DenseTier, n_pages: int, page_size: int, head_dim: int):
        self.tier = tier
        self.page_size = page_size
        self.head_dim = head_dim
        self.n_pages = n_pages
        self.k = np.zeros((n_pages, page_size, head_dim), dtype=tier.dtype)  # (N, P, D)
        self.v = np.zeros((n_pages, page_size, head_dim), dtype=tier.dtype)  # (N, P, D)
        self.fill = np.zeros(n_pages, dtype=np.int32)  # (N,)
        self.positions = np.full((n_pages, page_size), -1, dtype=np.int32)  # (N, P)
        # Free list as a stack; lowest ids handed out first so tests are deterministic.
        self._free = list(range(n_pages - 1, -1, -1))
        self._in_use = np.zeros(n_pages, dtype=bool)

    @property
    def page_bytes(self) -> int:
        return self.tier.page_bytes(self.page_size, self.head_dim)

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_used(self) -> int:
        return self.n_pages - len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise ContextOverflowError(
                f"KV page pool for tier {self.tier.name!r} is exhausted ({self.n_pages} pages of "
                f"{self.page_size} tokens); the context is full"
            )
        pid = self._free.pop()
        self._in_use[pid] = True
        self.fill[pid] = 0
        self.positions[pid] = -1
        return pid

    def free(self, pid: int) -> None:
        if not self._in_use[pid]:
            raise RuntimeError(f"page {pid} of tier {self.tier.name!r} freed twice")
        self._in_use[pid] = False
        self.fill[pid] = 0
        self.positions[pid] = -1
        self._free.append(pid)

    def poison_unused(self) -> None:
        """Test hook: fill every slot at or past `fill` (and free pages) with NaN."""
        slot = np.arange(self.page_size)[None, :]
        unused = slot >= self.fill[:, None]  # (N, P)
        self.k[unused] = np.nan
        self.v[unused] = np.nan
