"""Preallocated page pools, one per tier, with a free list.

A pool owns the storage of its tier's pages (`tier.alloc`) and their per-page metadata (fill, positions);
see `skvrt.kv.pages` for the contract. Memory is allocated once, at construction, and never grows.
"""

from __future__ import annotations

import numpy as np

from ..errors import ContextOverflowError
from .tiers import DenseTier, QuantTier  # noqa: F401  (re-exported)


class TierPool:
    """n_pages pages of one tier: `data` (the tier's arrays), fill (N,), positions (N, P)."""

    def __init__(self, tier, n_pages: int, page_size: int, head_dim: int):
        self.tier = tier
        self.page_size = page_size
        self.head_dim = head_dim
        self.n_pages = n_pages
        self.data = tier.alloc(n_pages, page_size, head_dim)
        self.fill = np.zeros(n_pages, dtype=np.int32)  # (N,)
        self.positions = np.full((n_pages, page_size), -1, dtype=np.int32)  # (N, P)
        # Free list as a stack; lowest ids handed out first so runs are deterministic.
        self._free = list(range(n_pages - 1, -1, -1))
        self._in_use = np.zeros(n_pages, dtype=bool)

    # dense-tier storage, as the C kernel reads it
    @property
    def k(self) -> np.ndarray:
        return self.data["k"]

    @property
    def v(self) -> np.ndarray:
        return self.data["v"]

    @property
    def page_bytes(self) -> int:
        return self.tier.page_bytes(self.page_size, self.head_dim)

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_used(self) -> int:
        return self.n_pages - len(self._free)

    def in_use(self, pid: int) -> bool:
        return bool(self._in_use[pid])

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

    def compact(self, pid: int, keep: np.ndarray) -> None:
        """Keep the slots of page `pid` where keep (fill,) is True, moved to the front in order."""
        n, f = int(keep.sum()), len(keep)
        for name in self.tier.per_slot:
            arr = self.data[name]
            arr[pid, :n] = arr[pid, :f][keep]
        self.positions[pid, :n] = self.positions[pid, :f][keep]
        self.positions[pid, n:] = -1
        self.fill[pid] = n

    def poison_unused(self) -> None:
        """Test hook: fill every float slot at or past `fill` with NaN (integer codes are left as they are)."""
        unused = np.arange(self.page_size)[None, :] >= self.fill[:, None]  # (N, P)
        for name in self.tier.per_slot:
            arr = self.data[name]
            if arr.dtype.kind == "f":
                arr[unused] = np.nan
