"""PagedKVCache: one sequence's KV cache, the object the model is handed.

Layers call `cache.append(layer, k, v)` then `cache.attend(layer, q, positions)`; after a forward pass the
model calls `cache.advance(T)`. Storage is a set of preallocated, tier-homogeneous page pools
(`skvrt.kv.pool`) addressed through a page table (`skvrt.kv.pages`, where the contract is written).

New tokens always enter the dense tier (pool 0). Under a compressing policy, `advance` moves tokens that
left the recent window -- except the first `sinks` -- out of the dense tier a page at a time: re-encoded into
the policy's old-token tier (pool 1), or dropped. So the dense tier holds sinks + between `window` and
`window + P - 1` recent tokens (+ the chunk being prefilled), and memory stays bounded between prefill chunks.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import ckernels
from ..errors import ContextOverflowError
from .ada import AdaTier, split_bits
from .attention import gather_dense, softmax_attend
from .pages import PAGE_SIZE, PageTable
from .pool import TierPool
from .tiers import DenseTier

DENSE = 0  # tier index of the dense tier
OLD = 1  # tier index of the policy's old-token tier, when it has one
MAX_CHUNK = 512  # largest forward() a compressing policy's dense pool is sized for


@dataclasses.dataclass(frozen=True)
class Policy:
    """What happens to tokens that leave the recent window. keep_all: full cache (nothing leaves)."""

    name: str = "full"
    sinks: int = 4
    window: int = 64
    old_tier: object | None = None  # a tier from skvrt.kv.tiers, or None = drop
    keep_all: bool = True


def _logits(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """q (G, T, D), k (N, D) -> q . k (G, T, N) as one BLAS GEMM (np.einsum would not use BLAS)."""
    G, T, D = q.shape
    return (q.reshape(G * T, D) @ k.T).reshape(G, T, -1)


class PagedKVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_ctx: int,
                 kv_dtype: str = "float16", page_size: int = PAGE_SIZE, policy: Policy = Policy()):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.n_ctx = n_ctx
        self.page_size = P = page_size
        self.policy = policy
        heads = n_layers * n_kv_heads
        all_pages = math.ceil(n_ctx / P)
        if policy.keep_all:
            dense_pages = all_pages
        else:  # sinks + window + one page being filled + a prefill chunk, each possibly page-misaligned
            dense_pages = min(all_pages, math.ceil((policy.sinks + policy.window + P + MAX_CHUNK) / P) + 3)
        self.pools: list[TierPool] = [TierPool(DenseTier(kv_dtype), heads * dense_pages, P, head_dim)]
        if not policy.keep_all and policy.old_tier is not None:
            self.pools.append(TierPool(policy.old_tier, heads * all_pages, P, head_dim))
        self.table = PageTable(n_layers, n_kv_heads, all_pages + dense_pages)
        self.offset = 0  # tokens committed (the next token's position)
        self.n_old = 0  # tokens moved out of the dense tier: positions [sinks, sinks + n_old)
        self.scale = head_dim ** -0.5
        self.use_c = ckernels.lib() is not None  # decode steps through the C kernels; NumPy twins otherwise
        self._ada_bits = None  # (angle bits, radius bits) (L, H, D/2) uint8 for the C ADA kernel
        if isinstance(policy.old_tier, AdaTier):
            ba, br = split_bits(policy.old_tier.pair_bits)
            self._ada_bits = (np.ascontiguousarray(ba, np.uint8), np.ascontiguousarray(br, np.uint8))

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
        if not self.policy.keep_all and T > MAX_CHUNK:
            raise ValueError(f"forward chunks must be <= {MAX_CHUNK} tokens under the {self.policy.name} policy")
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
                pool.tier.write(pool.data, pid, f, k[h, t : t + n], v[h, t : t + n])
                pool.positions[pid, f : f + n] = positions[t : t + n]
                pool.fill[pid] = f + n
                t += n

    def advance(self, n_tokens: int) -> None:
        self.offset += n_tokens
        p = self.policy
        if p.keep_all:
            return
        P = self.page_size
        while self.offset - p.window - p.sinks - self.n_old >= P:
            lo = p.sinks + self.n_old
            for layer in range(self.n_layers):
                for h in range(self.n_kv_heads):
                    self._move_old(layer, h, lo, lo + P)
            self.n_old += P

    def _move_old(self, layer: int, h: int, lo: int, hi: int) -> None:
        """Take positions [lo, hi) out of the dense pages of (layer, h): encode them into one page of the
        old-token tier, or drop them. Emptied dense pages go back to the pool."""
        dense = self.pools[DENSE]
        ks, vs, ps = [], [], []
        i = 0
        while i < self.table.n_pages[layer, h]:
            if self.table.page_tiers[layer, h, i] != DENSE:
                i += 1
                continue
            pid = int(self.table.page_ids[layer, h, i])
            f = int(dense.fill[pid])
            pos = dense.positions[pid, :f]
            take = (pos >= lo) & (pos < hi)
            if take.any():
                k, v = dense.tier.read(dense.data, np.array([pid]))
                ks.append(k[0, :f][take])
                vs.append(v[0, :f][take])
                ps.append(pos[take])
                if take.all():
                    dense.free(pid)
                    self.table.remove(layer, h, i)
                    continue
                dense.compact(pid, ~take)
            i += 1
        if self.policy.old_tier is None or not ps:
            return
        old = self.pools[OLD]
        pid = old.alloc()
        k, v, pos = np.concatenate(ks), np.concatenate(vs), np.concatenate(ps)
        old.tier.write_page(old.data, pid, k, v, (layer, h))
        old.positions[pid, : len(pos)] = pos
        old.fill[pid] = len(pos)
        self.table.push(layer, h, pid, OLD)

    # ---- reading -------------------------------------------------------------------------------------

    def attend(self, layer: int, q: np.ndarray, q_positions: np.ndarray) -> np.ndarray:
        """q: (nq, T, D) post-RoPE queries at q_positions (T,) -> (nq, T, D) attention outputs (GQA)."""
        nq, T, D = q.shape
        G = nq // self.n_kv_heads
        if T == 1 and self.use_c and len(self.pools) == 1:
            out = np.empty((nq, D), dtype=np.float32)
            ckernels.dense_decode(np.ascontiguousarray(q[:, 0], dtype=np.float32), self.pools[DENSE],
                                  self.table.page_ids[layer], self.table.n_pages[layer], self.scale, out)
            return out[:, None, :]
        if T == 1 and self.use_c and self._ada_bits is not None:  # decode over dense + ADA pages, from codes
            out = np.empty((nq, D), dtype=np.float32)
            ba, br = self._ada_bits
            ckernels.mixed_decode(np.ascontiguousarray(q[:, 0], dtype=np.float32), self.pools[DENSE],
                                  self.pools[OLD], self.table.page_ids[layer], self.table.page_tiers[layer],
                                  self.table.n_pages[layer], ba[layer], br[layer], self.scale, out)
            return out[:, None, :]
        out = np.empty_like(q)
        for h in range(self.n_kv_heads):
            qh = q[h * G : (h + 1) * G]
            scores, values, kpos = self._scores(layer, h, qh)
            out[h * G : (h + 1) * G] = softmax_attend(scores, values, kpos, q_positions)
        return out

    def _scores(self, layer: int, h: int, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """NumPy twin over every tier of (layer, h): q (G, T, D) -> scaled logits (G, T, N), V (N, D), pos (N,).
        Tiers with a `scores` method (ADA) compute logits from their codes; others return keys to dot with."""
        ids, tiers = self.table.pages(layer, h)
        parts = []
        for t, pool in enumerate(self.pools):
            pids = ids[tiers == t]
            if not len(pids):
                continue
            if t == DENSE:
                k, v, pos = gather_dense(pool, pids)
                parts.append((_logits(q, k) * np.float32(self.scale), v, pos))
                continue
            valid = np.arange(self.page_size)[None, :] < pool.fill[pids][:, None]  # (n, P)
            pos = pool.positions[pids][valid]
            if hasattr(pool.tier, "scores") and q.shape[1] <= 8:  # decode: logits from the codes (LUT twin)
                s = pool.tier.scores(pool.data, pids, q, (layer, h), self.scale)  # (G, T, n, P)
                parts.append((s[:, :, valid], pool.tier.read_values(pool.data, pids)[valid], pos))
            elif hasattr(pool.tier, "scores"):
                # prefill chunk: the same logits as a GEMM over keys decoded transiently for this (layer, head)
                # (a (chunk x N) LUT gather costs ~50x more in NumPy; decode steps never take this path)
                if self.use_c and self._ada_bits is not None:
                    ba, br = self._ada_bits
                    k, v = ckernels.ada_decode_pages(pool, pids, ba[layer, h], br[layer, h])
                else:
                    k, v = pool.tier.decode_keys(pool.data, pids, (layer, h)), pool.tier.read_values(pool.data, pids)
                parts.append((_logits(q, k[valid]) * np.float32(self.scale), v[valid], pos))
            else:
                k, v = pool.tier.read(pool.data, pids)
                parts.append((_logits(q, k[valid]) * np.float32(self.scale), v[valid], pos))
        if not parts:
            G, T, D = q.shape
            return np.zeros((G, T, 0), np.float32), np.zeros((0, D), np.float32), np.zeros(0, np.int32)
        return (np.concatenate([p[0] for p in parts], axis=-1), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]))

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
                        pool.compact(pid, keep)
                    i += 1
        self.offset = n_tokens
        self.n_old = max(0, min(self.n_old, n_tokens - self.policy.sinks))

    def reset(self) -> None:
        self.truncate(0)

    # ---- accounting ----------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Real allocations: pages in use and their bytes (metadata included), and the preallocated pool."""
        used = sum(p.n_used * p.page_bytes for p in self.pools)
        capacity = sum(p.n_pages * p.page_bytes for p in self.pools)
        dense_fp16 = self.offset * self.n_layers * self.n_kv_heads * 2 * self.head_dim * 2
        return {
            "policy": self.policy.name,
            "tokens": self.offset,
            "n_ctx": self.n_ctx,
            "pages_used": sum(p.n_used for p in self.pools),
            "pages_total": sum(p.n_pages for p in self.pools),
            "pages_by_tier": {p.tier.name: p.n_used for p in self.pools},
            "bytes_used": used,
            "bytes_pool": capacity,
            "bytes_per_token": used / self.offset if self.offset else 0.0,
            "fraction_of_fp16": used / dense_fp16 if dense_fp16 else 0.0,
        }

    def bytes_per_token_full(self) -> int:
        """Dense payload bytes per token across all layers and heads (K and V)."""
        return self.n_layers * self.n_kv_heads * self.pools[DENSE].tier.bytes_per_token(self.head_dim)
