"""The page-table contract, written once. Pure NumPy metadata; no tensor data lives here.

Terms
    L  layers, H  KV heads, P  tokens per page (PAGE_SIZE), D  head_dim,
    T  tiers (tier index 0 is always the dense tier), N_t  pages in tier t's pool.

Page table of one sequence (this module, `PageTable`):
    page_ids   (L, H, max_pages) int32   page id inside its tier's pool; -1 where unused
    page_tiers (L, H, max_pages) int8    tier index of each page; -1 where unused
    n_pages    (L, H)            int32   pages in use for each (layer, kv head); entries [0, n_pages) are valid

Per-page metadata, owned by each tier's pool (`skvrt.kv.pool.TierPool`):
    fill       (N_t,)    int32   tokens written into the page, slots [0, fill) are valid
    positions  (N_t, P)  int32   absolute token position of each slot; -1 where unused

Rules
    * A page holds tokens of exactly one (sequence, layer, kv head, tier): pages are tier-homogeneous.
    * Within one (layer, head), a token position appears at most once across all its pages.
    * Slots at or past `fill` are never read (tests fill them with NaN to prove it).
    * Pages need not be in position order; causal masking uses `positions`, not slot order.
"""

from __future__ import annotations

import numpy as np

PAGE_SIZE = 64  # tokens per page; see docs/FORMAT.md for why


class PageTable:
    def __init__(self, n_layers: int, n_kv_heads: int, max_pages: int):
        shape = (n_layers, n_kv_heads, max_pages)
        self.page_ids = np.full(shape, -1, dtype=np.int32)
        self.page_tiers = np.full(shape, -1, dtype=np.int8)
        self.n_pages = np.zeros((n_layers, n_kv_heads), dtype=np.int32)

    @property
    def max_pages(self) -> int:
        return self.page_ids.shape[2]

    def entries(self, layers=None) -> np.ndarray:
        """-> (L, H, max_pages) bool (the rows of `layers` only, when given): which slots hold a page."""
        n = self.n_pages if layers is None else self.n_pages[layers]
        return np.arange(self.max_pages) < n[..., None]

    def pages(self, layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (page_ids (n,), page_tiers (n,)) of one (layer, head), views into the table."""
        n = self.n_pages[layer, head]
        return self.page_ids[layer, head, :n], self.page_tiers[layer, head, :n]

    def push(self, layer: int, head: int, page_id: int, tier: int) -> None:
        n = self.n_pages[layer, head]
        if n >= self.max_pages:
            raise IndexError(f"page table full for layer {layer} head {head} ({self.max_pages} pages)")
        self.page_ids[layer, head, n] = page_id
        self.page_tiers[layer, head, n] = tier
        self.n_pages[layer, head] = n + 1

    def remove(self, layer: int, head: int, index: int) -> None:
        """Delete entry `index` of (layer, head), keeping the others in order."""
        n = self.n_pages[layer, head]
        ids, tiers = self.page_ids[layer, head], self.page_tiers[layer, head]
        ids[index : n - 1] = ids[index + 1 : n].copy()
        tiers[index : n - 1] = tiers[index + 1 : n].copy()
        ids[n - 1], tiers[n - 1] = -1, -1
        self.n_pages[layer, head] = n - 1

    def last(self, layer: int, head: int, tier: int) -> int:
        """Index of the last page of `tier` for (layer, head), or -1."""
        n = self.n_pages[layer, head]
        hits = np.nonzero(self.page_tiers[layer, head, :n] == tier)[0]
        return int(hits[-1]) if len(hits) else -1
