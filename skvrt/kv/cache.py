"""PagedKVCache: one sequence's KV cache, the object the model is handed.

Layers call `cache.append(layer, k, v)` then `cache.attend(layer, q, positions)`; after a forward pass the
model calls `cache.advance(T)`. Storage is a set of preallocated, tier-homogeneous page pools
(`skvrt.kv.pool`) addressed through a page table (`skvrt.kv.pages`, where the contract is written).
"""

from __future__ import annotations

import math

import numpy as np

from .. import ckernels
from ..errors import ContextOverflowError
from .attention import attend_dense, gather_dense
from .pages import PAGE_SIZE, PageTable
from .pool import DenseTier, TierPool

DENSE = 0  # tier index of the dense tier


class PagedKVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_ctx: int,
                 kv_dtype: str = "float16", page_size: int = PAGE_SIZE):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.n_ctx = n_ctx
        self.page_size = page_size
        pages_per_head = math.ceil(n_ctx / page_size)
        self.pools: list[TierPool] = [
            TierPool(DenseTier(kv_dtype), n_layers * n_kv_heads * pages_per_head, page_size, head_dim)
        ]
        self.table = PageTable(n_layers, n_kv_heads, pages_per_head)
        self.offset = 0  # tokens committed (the next token's position)
        self.scale = head_dim ** -0.5
        self.use_c = ckernels.lib() is not None  # decode steps through the C kernel; NumPy twin otherwise

    @classmethod
    def for_model(cls, args, n_ctx: int | None = None, kv_dtype: str = "float16", **kw) -> "PagedKVCache":
        n_ctx = n_ctx or args.max_position_embeddings
        return cls(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, n_ctx, kv_dtype, **kw)

    # ---- writing -------------------------------------------------------------------------------------

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v: (H, T, D) post-RoPE keys / values of T new tokens at positions offset .. offset+T-1."""
        H, T, _ = k.shape
        if self.offset + T > self.n_ctx:
            raise ContextOverflowError(
                f"context full: {self.offset} cached + {T} new tokens > n_ctx {self.n_ctx}"
            )
        pool = self.pools[DENSE]
        P = self.page_size
        positions = np.arange(self.offset, self.offset + T, dtype=np.int32)
        for h in range(H):
            t = 0
            idx = self.table.last(layer, h, DENSE)
            pid = int(self.table.page_ids[layer, h, idx]) if idx >= 0 else -1
            while t < T:
                if pid < 0 or pool.fill[pid] == P:
                    pid = pool.alloc()
                    self.table.push(layer, h, pid, DENSE)
                f = int(pool.fill[pid])
                n = min(P - f, T - t)
                pool.k[pid, f : f + n] = k[h, t : t + n]
                pool.v[pid, f : f + n] = v[h, t : t + n]
                pool.positions[pid, f : f + n] = positions[t : t + n]
                pool.fill[pid] = f + n
                t += n

    def advance(self, n_tokens: int) -> None:
        self.offset += n_tokens

    # ---- reading -------------------------------------------------------------------------------------

    def attend(self, layer: int, q: np.ndarray, q_positions: np.ndarray) -> np.ndarray:
        """q: (nq, T, D) post-RoPE queries at q_positions (T,) -> (nq, T, D) attention outputs (GQA)."""
        nq, T, D = q.shape
        G = nq // self.n_kv_heads
        if T == 1 and self.use_c and not (self.table.page_tiers[layer] > DENSE).any():
            out = np.empty((nq, D), dtype=np.float32)
            ckernels.dense_decode(np.ascontiguousarray(q[:, 0], dtype=np.float32), self.pools[DENSE],
                                  self.table.page_ids[layer], self.table.n_pages[layer], self.scale, out)
            return out[:, None, :]
        out = np.empty_like(q)
        for h in range(self.n_kv_heads):
            ids, tiers = self.table.pages(layer, h)
            k, v, kpos = gather_dense(self.pools[DENSE], ids[tiers == DENSE])
            out[h * G : (h + 1) * G] = attend_dense(q[h * G : (h + 1) * G], k, v, kpos, q_positions, self.scale)
        return out

    # ---- editing -------------------------------------------------------------------------------------

    def truncate(self, n_tokens: int) -> None:
        """Forget every token at position >= n_tokens (keeps the common prefix for chat turns / regen).

        truncate(offset) removes what an interrupted forward pass appended without committing."""
        if n_tokens > self.offset:
            return
        for layer in range(self.n_layers):
            for h in range(self.n_kv_heads):
                i = 0
                while i < self.table.n_pages[layer, h]:
                    pid = int(self.table.page_ids[layer, h, i])
                    pool = self.pools[int(self.table.page_tiers[layer, h, i])]
                    f = int(pool.fill[pid])
                    keep = pool.positions[pid, :f] < n_tokens
                    if not keep.any():
                        pool.free(pid)
                        self.table.remove(layer, h, i)
                        continue
                    if not keep.all():
                        self._compact(pool, pid, keep)
                    i += 1
        self.offset = n_tokens

    @staticmethod
    def _compact(pool: TierPool, pid: int, keep: np.ndarray) -> None:
        n = int(keep.sum())
        f = len(keep)
        pool.k[pid, :n] = pool.k[pid, :f][keep]
        pool.v[pid, :n] = pool.v[pid, :f][keep]
        pool.positions[pid, :n] = pool.positions[pid, :f][keep]
        pool.positions[pid, n:] = -1
        pool.fill[pid] = n

    def reset(self) -> None:
        self.truncate(0)

    # ---- accounting ----------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Real allocations: pages in use and their bytes (metadata included), and the preallocated pool."""
        used = sum(p.n_used * p.page_bytes for p in self.pools)
        capacity = sum(p.n_pages * p.page_bytes for p in self.pools)
        dense_fp16 = self.offset * self.n_layers * self.n_kv_heads * 2 * self.head_dim * 2
        return {
            "tokens": self.offset,
            "n_ctx": self.n_ctx,
            "pages_used": sum(p.n_used for p in self.pools),
            "pages_total": sum(p.n_pages for p in self.pools),
            "bytes_used": used,
            "bytes_pool": capacity,
            "bytes_per_token": used / self.offset if self.offset else 0.0,
            "fraction_of_fp16": used / dense_fp16 if dense_fp16 else 0.0,
        }

    def bytes_per_token_full(self) -> int:
        """Dense payload bytes per token across all layers and heads (K and V)."""
        return self.n_layers * self.n_kv_heads * self.pools[DENSE].tier.bytes_per_token(self.head_dim)
