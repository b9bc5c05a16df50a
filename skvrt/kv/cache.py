"""PagedKVCache: one sequence's KV cache, the object the model is handed.

Layers call `cache.append(layer, k, v)` then `cache.attend(layer, q, positions)`; after a forward pass the
model calls `cache.advance(T)`. Storage is one preallocated frame arena (`skvrt.kv.pool`) holding the pages
of every tier, addressed through a page table (`skvrt.kv.pages`, where the contract is written).

New tokens always enter the dense tier (pool 0). Under a compressing policy, `advance` takes tokens that
left the recent window -- except the first `sinks` -- out of the dense tier:
  * allocator "fifo" (window / ada / quant): a page-size batch at a time, re-encoded whole into the policy's
    old-token tier (pool 1), or dropped when there is none;
  * allocator "rdr" (spherical / snapkv / h2o): every token outside sinks + window is (re)assigned a tier or
    dropped by `skvrt.kv.rdr.assign`, jointly over all layers and heads, so that the arena -- the byte budget
    -- is never exceeded; stored tokens are only ever demoted (re-encoded from the copy they have). Between
    searches, tokens leaving the window take their tiers at the last search's multiplier (`_place`; a search
    leaves room for the next DECODE_AHEAD rounds); demotions leave holes in pages, merged into fresh pages only
    when frames are needed (`_reclaim`), so a page is re-encoded when the budget needs its frame, not each round.
So the dense tier holds sinks + between `window` and `window + batch - 1` recent tokens (+ the chunk being
prefilled), and memory stays bounded between prefill chunks.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from .. import ckernels
from ..errors import ContextOverflowError, InputError
from ..ops import logsumexp
from . import layout, rdr, slot_mass
from .ada import AdaTier
from .attention import softmax_attend
from .pages import PAGE_SIZE, PageTable
from .pool import FrameArena, TierPool
from .tiers import DenseTier

DENSE = 0  # tier index of the dense tier
OLD = 1  # tier index of the fifo policies' old-token tier, when they have one
MAX_CHUNK = 512  # largest forward() a compressing policy's dense tier is sized for
DECODE_AHEAD = 2  # rdr: a search during decode leaves room for this many rounds of departures, which then take
# their tiers at its multiplier without a search (a search re-reads every old token: ~0.5 s at 4K tokens). Dev
# text, 10 % budget: a search every round KL 0.0622, 2 rounds ahead 0.0643, 4 ahead 0.0673 (idle frames) --
# at most AHEAD_SHARE of the arena (snapkv / h2o, whose old tier is dense, would idle a page per head a round)
AHEAD_SHARE = 1 / 50
SURPRISAL_CAP = 8.0  # rdr: most uniform shares of utility floor a token's surprisal earns (Policy.surprisal);
# also what a token gets before its surprisal is known (the prefill tokens that leave the window inside the
# forward that computes it): unread text is not presumed predictable
RDR_CHUNK = 64  # prefill chunk of the rdr policies (the dense tier holds one chunk inside the budget; smaller
# chunks mean more allocation rounds, each re-encoding open pages: 32 measured worse than 64 on the dev text)


@dataclasses.dataclass(frozen=True, eq=False)
class Policy:
    """What happens to tokens that leave the recent window. keep_all: full cache (nothing leaves)."""

    name: str = "full"
    sinks: int = 4
    window: int = 64
    old_tiers: tuple = ()  # tiers for tokens that leave the window, richest first; () = drop (fifo)
    keep_all: bool = True
    allocator: str = "fifo"  # "fifo" or "rdr" (see the module docstring)
    utility: str = "mean"  # rdr: "mean" attention mass per observing query, "sum" (H2O), "prefill" (observation
    # windows of prefill chunks only)
    distortion: np.ndarray | None = None  # rdr: (L, H, len(old_tiers)) relative distortion (drop = 1)
    budget: str | int | float | None = None  # bytes (int), "25%", "64MiB", a fraction (float); None: no cap
    obs: int = 32  # rdr: observation window, the last queries of each prefill chunk that score tokens
    chunk: int | None = None  # largest forward() (default MAX_CHUNK; RDR_CHUNK for rdr)
    batch: int | None = None  # rdr: tokens per (layer, head) that leave the window per round (default a dense page)
    drop_cost: float = 1.0  # rdr: distortion of dropping a token (see rdr.assign)
    head_weight: np.ndarray | None = None  # rdr: (L, H) each head's distortions, dropping included, times this:
    # how much the model's output cares about the head's attention (the sidecar's head sensitivity, see
    # skvrt.head_sensitivity, to a power; geometric mean 1). None: every head alike
    keep_if_fits: bool = False  # rdr: when the budget can hold the whole context (n_ctx) at the cheapest old tier,
    # drop nothing while every token fits there (PagedKVCache.keeps_all, rdr.all_fit_cheapest)
    util_floor: float = 0.0  # rdr: utility every token has whatever attention it got, as a fraction of a uniform
    # share (1 / tokens in context): a future query may retrieve a token no query has looked at yet
    surprisal: float = 0.0  # rdr: share of the utility floor spread over tokens by their surprisal (the model's
    # -log p of the token given the text before it) instead of evenly: a token's floor is (1 - surprisal) +
    # surprisal * min(s / mean s, SURPRISAL_CAP) uniform shares (`PagedKVCache.floor_weights`)
    lookahead: bool | None = False  # rdr: prefill a prompt twice (generate.prefill): the first pass records the
    # prompt's last `obs` queries per layer, the second adds to each token's utility the attention those queries
    # give it, computed as it leaves the window (`PagedKVCache.begin_lookahead`), and its own queries observe
    # nothing (the last queries stand for them): tiers are chosen knowing what the prompt ends with. None = auto:
    # only when the budget cannot hold the whole context (n_ctx) at the cheapest old tier, i.e. when tokens will be
    # dropped (PagedKVCache.holds_all)
    horizon: int = 256  # rdr with lookahead: tokens a continuation is expected to span. Each head's prior is scaled
    # by the share of its last queries' attention that lies further back than a query of the continuation will be
    # from the prompt's end (weight min(distance, horizon) / horizon): a head that attends nearby will give the
    # prompt's old tokens little, so they cost it little (`PagedKVCache._record_queries`). 0: no scaling
    ladder_by_room: bool = False  # rdr, a ladder that starts with a dense old tier: keep only the tiers the budget
    # calls for. When the budget holds the whole context (n_ctx) at the richest coded tier: dense and that tier
    # (the cheaper steps would only pay for dense old tokens; dev, 33.4 %: KL 0.0013 -> 0.0012 / 0.0010); below
    # that, the coded tiers (a dense tier would only hold tokens while the budget is loose early on, then be
    # demoted from; dev: KL level, allocator work doubled)

    @property
    def old_tier(self):
        return self.old_tiers[0] if self.old_tiers else None

    @property
    def max_chunk(self) -> int:
        return self.chunk or (RDR_CHUNK if self.allocator == "rdr" else MAX_CHUNK)


def parse_budget(budget, dense_fp16_bytes: int) -> int:
    """'25%', '0.25', 0.25, '64MiB', '1.5GB', '123456' or an int -> bytes (of the dense fp16 KV bytes for
    fractions)."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    if isinstance(budget, (int, np.integer)) and not isinstance(budget, bool):
        return int(budget)
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise InputError(f"--kv-budget fraction must be in (0, 1], not {budget}")
        return int(budget * dense_fp16_bytes)
    s = str(budget).strip().lower().replace(" ", "")
    try:
        if s.endswith("%"):
            return parse_budget(float(s[:-1]) / 100, dense_fp16_bytes)
        for u, mult in units.items():
            if s.endswith(u) and s[: -len(u)]:
                return int(float(s[: -len(u)]) * mult)
        x = float(s)
    except ValueError:
        raise InputError(f"bad --kv-budget {budget!r}: use a percentage of the fp16 KV cache (25%), a "
                         f"fraction (0.25) or bytes (64MiB, 1.5GB, 123456)") from None
    return parse_budget(x if x <= 1 else int(x), dense_fp16_bytes)


def _logits(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """q (G, T, D), k (N, D) -> q . k (G, T, N) as one BLAS GEMM (np.einsum would not use BLAS)."""
    G, T, D = q.shape
    return (q.reshape(G * T, D) @ k.T).reshape(G, T, -1)


class PagedKVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_ctx: int,
                 kv_dtype: str = "float16", page_size: int = PAGE_SIZE, policy: Policy = Policy()):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.n_ctx = n_ctx
        self.page_size = P = page_size  # tokens per page of the old-token tier (fifo) / dense tier (full)
        self.policy = policy
        self.max_chunk = policy.max_chunk
        heads = n_layers * n_kv_heads
        D = head_dim
        self.track_mass = policy.allocator == "rdr"
        self.pos_dtype = pd = layout.position_dtype(n_ctx, self.track_mass)
        tiers = [DenseTier(kv_dtype), *policy.old_tiers]
        # one frame = one page of the richest coded old tier at P tokens (of the dense tier without coded old
        # tiers); the other tiers' pages hold as many tokens as fit a frame (fifo old tiers: exactly P, whole
        # batches) -- a dense old tier beside coded ones (spherical's ladder) gets a coded tier's frame
        coded = [t for t in policy.old_tiers if not isinstance(t, DenseTier)]
        frame = max(layout.page_bytes(t, P, D, self.track_mass, pd) for t in (coded or policy.old_tiers or tiers[:1]))
        sizes = [layout.tokens_per_frame(t, frame, D, self.track_mass, pd) for t in tiers]
        if policy.allocator == "fifo":
            sizes[1:] = [P] * (len(tiers) - 1)
            if len(tiers) == 1:
                sizes[DENSE] = P
        if min(sizes) < 1:
            raise ValueError(f"a page frame of {frame} bytes cannot hold a token of every tier")
        # tokens leaving the window at once
        self.batch = (policy.batch or sizes[DENSE]) if policy.allocator == "rdr" else P
        Pd = sizes[DENSE]
        self.dense_fp16_bytes = n_ctx * heads * 2 * D * 2
        if policy.budget is not None:
            self.budget = parse_budget(policy.budget, self.dense_fp16_bytes)
            n_frames = self.budget // (frame + layout.FILL_BYTES)
            per_head_min = math.ceil((policy.sinks + policy.window + self.batch + 1) / Pd) + 2
            if n_frames < heads * per_head_min:
                need = heads * per_head_min * (frame + layout.FILL_BYTES)
                raise InputError(f"--kv-budget {policy.budget} ({self.budget:,} bytes) is smaller than the "
                                 f"{policy.name} policy's sinks + recent window need: at least {need:,} bytes "
                                 f"({need / self.dense_fp16_bytes:.1%} of the fp16 cache at n_ctx {n_ctx}); "
                                 f"raise the budget or lower window=")
            # a prefill chunk must fit next to the pinned tokens once every old token is dropped
            room = (n_frames // heads - 2) * Pd - (policy.sinks + policy.window + self.batch)
            self.max_chunk = max(1, min(self.max_chunk, room))
        else:
            self.budget = None
            if policy.allocator == "rdr":
                raise InputError(f"--kv-policy {policy.name} needs a --kv-budget (e.g. 25%)")
            dense_need = (math.ceil(n_ctx / Pd) if policy.keep_all else
                          math.ceil((policy.sinks + policy.window + self.batch + self.max_chunk) / Pd) + 2)
            old_need = math.ceil(n_ctx / sizes[OLD]) if policy.old_tiers and not policy.keep_all else 0
            n_frames = heads * (dense_need + old_need)
        def holds_context(tokens_per_page: int) -> bool:  # the arena holds n_ctx old tokens at this page size beside
            # the dense tier (sinks + window + half a batch per head on average; an estimate)
            return n_frames >= heads * (n_ctx / tokens_per_page + (policy.sinks + policy.window + self.batch / 2) / Pd)

        def holds_context_surely(tokens_per_page: int) -> bool:  # the same, counting whole pages: every old token
            # fits at this page size beside a full dense tier (sinks + window + a batch)
            return n_frames >= heads * (math.ceil(n_ctx / tokens_per_page)
                                        + math.ceil((policy.sinks + policy.window + self.batch) / Pd))

        if policy.ladder_by_room and policy.budget is not None and len(tiers) > 2 and isinstance(tiers[1], DenseTier):
            old = [0, 1] if holds_context_surely(sizes[2]) else list(range(1, len(tiers) - 1))  # into policy.old_tiers
            dist = policy.distortion[..., old] if policy.distortion is not None else None
            policy = self.policy = dataclasses.replace(policy, old_tiers=tuple(policy.old_tiers[i] for i in old),
                                                       distortion=dist)
            tiers, sizes = [tiers[0], *(tiers[i + 1] for i in old)], [sizes[0], *(sizes[i + 1] for i in old)]
        self.arena = FrameArena(n_frames, frame)
        self.pools: list[TierPool] = [TierPool(t, page_size=sz, head_dim=D, arena=self.arena, index=i,
                                               track_mass=self.track_mass, pos_dtype=pd)
                                       for i, (t, sz) in enumerate(zip(tiers, sizes))]
        max_pages = min(n_frames, sum(math.ceil(n_ctx / sz) + 2 for sz in sizes))
        self.table = PageTable(n_layers, n_kv_heads, max_pages)
        self.offset = 0  # tokens committed (the next token's position)
        self.n_old = 0  # tokens moved out of the dense tier: positions [sinks, sinks + n_old)
        self.scale = head_dim ** -0.5
        self.use_c = ckernels.lib() is not None  # decode steps through the C kernels; NumPy twins otherwise
        self._ada_bits = {}  # pool index -> (angle bits, radius bits) (L, H, D/2) uint8 for the C kernels
        for i, t in enumerate(tiers):
            if isinstance(t, AdaTier):
                ba, br = t.widths_at()
                self._ada_bits[i] = (np.ascontiguousarray(ba, np.uint8), np.ascontiguousarray(br, np.uint8))
        self._c_decode = all(isinstance(t, (DenseTier, AdaTier)) for t in tiers)
        self._descs = {}  # (layer, with mass) -> ctypes TierDesc array for the C decode kernel
        self._obs = []  # positions of the queries whose attention was added to `mass` (sorted)
        self._pending_obs = []  # this forward's observers, recorded by attend(layer 0), committed by advance
        self._lam = None  # the allocator's last Lagrange multiplier (its next search starts there)
        self._allow_drop = True  # whether the last search could drop (keep_if_fits)
        self._departed = set()  # layers whose tokens leaving in this forward already took their tiers (_depart)
        self._depart_frames = 0  # old-tier frames the last layer's departure took (sizes later layers' room)
        self._round_frames = 0  # old-tier frames the last decode round's departures took (sizes the next rounds')
        self._attended = -1  # the last layer that attended in the forward in progress (its mass includes it)
        # keep_if_fits: the budget holds a whole context at the cheapest old tier beside the dense tier (sinks +
        # window + half a batch per head on average), so the allocator need not drop (an estimate: each search
        # checks what the arena holds, rdr.all_fit_cheapest in _rebalance)
        self.holds_all = bool(policy.budget is not None and policy.old_tiers and holds_context(sizes[-1]))
        self.keeps_all = bool(policy.keep_if_fits and self.holds_all)
        self._sizes = np.array([q.page_size for q in self.pools])  # tokens per page of each pool
        self._old_sizes = self._sizes[1:]  # of each old tier
        # surprisal (Policy.surprisal): the model's forward calls note_surprisal; per position, NaN = not known
        self.wants_surprisal = bool(policy.allocator == "rdr" and policy.surprisal > 0 and policy.util_floor > 0)
        self._surprisal = np.full(n_ctx, np.nan, np.float32) if self.wants_surprisal else None
        self._predicted = None  # (position, logits (V,)) the last forward's last token predicted for `position`
        # lookahead (Policy.lookahead): generate.prefill runs a first pass that records the prompt's last queries
        self.wants_lookahead = bool(policy.allocator == "rdr" and (
            policy.lookahead or (policy.lookahead is None and not self.holds_all)))
        self._look_end = None  # while recording: the prompt's end position; its last `obs` queries are kept
        self._look_rec = {}  # layer -> {"q": per KV head [(G, t, D)], "lse": per KV head [(G, t)], "reach": per KV
        # head [(t,)], "pos": [(t,)]}, one entry per chunk, recorded in the first pass
        self._look_q = None  # second pass: layer -> (q (nq, n, D), lse (nq, n), positions (n,), reach (H,)): the
        # prompt's last queries, and per KV head the share of their attention a continuation would still give the
        # prompt (`_record_queries`)
        self._look_until = None  # second pass: the prompt's end; its queries are not observers (their attention
        # would be the mean over every later prompt query, which predicts what follows the prompt worse than the
        # prompt's last queries alone: bench/utility_predictors.py), so a prompt token's utility is `_prior` plus
        # the mean over the queries after the prompt (decode steps)
        self._prior = np.zeros((heads, n_ctx), np.float32) if self.wants_lookahead else None  # (L H, n_ctx) the
        # attention each token gets from those queries (summed over the query group, mean over the queries)
        self.allocator_seconds = 0.0  # time spent in rdr.assign + applying its plans (reported by bench)
        self.allocator_runs = 0

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
        if not self.policy.keep_all and T > self.max_chunk:
            raise ValueError(f"forward chunks must be <= {self.max_chunk} tokens under the {self.policy.name} policy")
        pool = self.pools[DENSE]
        P = pool.page_size
        if self.policy.allocator == "rdr":
            self._make_room(layer, T)
        positions = np.arange(self.offset, self.offset + T, dtype=np.int32)
        rdr_ = self.policy.allocator == "rdr"
        for h in range(H):
            t = 0
            if rdr_:  # fill the free slots of every dense page (tokens leave them from anywhere), then new pages
                ids, tiers = self.table.pages(layer, h)
                open_ = [int(p) for p, tt in zip(ids, tiers) if tt == DENSE and pool.fill[p] < P]
            else:
                idx = self.table.last(layer, h, DENSE)
                open_ = [int(self.table.page_ids[layer, h, idx])] if idx >= 0 else []
            pid = open_.pop(0) if open_ else -1
            while t < T:
                if pid < 0 or pool.fill[pid] == P:
                    pid = open_.pop(0) if open_ else -1
                if pid < 0:
                    pid = self._alloc(DENSE)
                    self.table.push(layer, h, pid, DENSE)
                f = int(pool.fill[pid])
                n = min(P - f, T - t)
                pool.tier.write(pool.data, pid, f, k[h, t : t + n], v[h, t : t + n])
                pool.positions[pid, f : f + n] = positions[t : t + n]
                pool.fill[pid] = f + n
                t += n

    def advance(self, n_tokens: int) -> None:
        self.offset += n_tokens
        self._attended = -1
        if self._pending_obs:
            self._obs.extend(self._pending_obs)
            self._pending_obs = []
        p = self.policy
        if p.keep_all:
            return
        if p.allocator == "rdr":
            n_leave = self.offset - p.window - p.sinks - self.n_old
            departed, self._departed = self._departed, set()
            if n_leave >= self.batch:
                lo = p.sinks + self.n_old
                todo = [layer for layer in range(self.n_layers) if layer not in departed]
                if todo:  # decode steps (prefill chunks left layer by layer in attend)
                    t0 = time.perf_counter()
                    leaving = self._take_leaving(lo, lo + n_leave, todo)
                    self.allocator_seconds += time.perf_counter() - t0
                    # (reserving the next batch's dense page here saves the search when the dense pages fill, but
                    # idles a page per head: WikiText 10 % KL 0.0908 -> 0.0927 for spherical, 0.219 -> 0.232 snapkv)
                    self._round_frames = self._place(leaving, 1, range(self.n_layers), DECODE_AHEAD,
                                                     self._round_frames,
                                                     cap=0 if self._allow_drop else self._ahead_cap())
                self.n_old += n_leave
            return
        while self.offset - p.window - p.sinks - self.n_old >= self.batch:
            lo = p.sinks + self.n_old
            for layer in range(self.n_layers):
                for h in range(self.n_kv_heads):
                    self._move_old(layer, h, lo, lo + self.batch)
            self.n_old += self.batch

    def _compact_dense(self, layer: int, h: int) -> None:
        """Rewrite (layer, h)'s dense tokens into ceil(n / P) pages when holes left by departed tokens waste a
        page (dense copies are exact)."""
        pool = self.pools[DENSE]
        P = pool.page_size
        ids, tiers = self.table.pages(layer, h)
        dense = [int(p) for p, t in zip(ids, tiers) if t == DENSE]
        n = int(self.arena.fill[dense].sum()) if dense else 0
        if len(dense) <= -(-n // P):
            return
        k, v, pos, mass = self._take_dense(layer, h, 0, self.n_ctx + 1)  # + a forward in progress
        for s in range(0, len(pos), P):
            pid = self._alloc(DENSE)
            self.table.push(layer, h, pid, DENSE)
            m = len(pos[s : s + P])
            pool.tier.write(pool.data, pid, 0, k[s : s + P], v[s : s + P])
            pool.positions[pid, :m] = pos[s : s + P]
            if pool.mass is not None:
                pool.mass[pid, :m] = mass[s : s + P]
            self.arena.fill[pid] = m

    def _remove_slots(self, layer: int, h: int, i: int, pool, pid: int, out: np.ndarray) -> bool:
        """Remove the slots where out (fill,) is True from page pid (entry i of (layer, h)'s table): the page goes
        back to the arena when nothing is left, else it is compacted. -> True when entry i was removed."""
        if out.all():
            pool.free(pid)
            self.table.remove(layer, h, i)
            return True
        pool.compact(pid, ~out)
        return False

    def _take_dense(self, layer: int, h: int, lo: int, hi: int):
        """Remove positions [lo, hi) from the dense pages of (layer, h) -> their k, v (n, D) float32, positions
        (n,) and mass (n,) (or None), in position order. Emptied pages go back to the arena."""
        dense = self.pools[DENSE]
        ks, vs, ps, ms = [], [], [], []
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
                ps.append(pos[take].copy())
                if dense.mass is not None:
                    ms.append(dense.mass[pid, :f][take].copy())
                if self._remove_slots(layer, h, i, dense, pid, take):
                    continue
            i += 1
        D = self.head_dim
        if not ps:
            return np.zeros((0, D), np.float32), np.zeros((0, D), np.float32), np.zeros(0, np.int32), None
        order = np.argsort(np.concatenate(ps), kind="stable")
        mass = np.concatenate(ms)[order] if ms else None
        return (np.concatenate(ks)[order], np.concatenate(vs)[order], np.concatenate(ps)[order], mass)

    def _move_old(self, layer: int, h: int, lo: int, hi: int) -> None:
        """fifo: take positions [lo, hi) out of the dense pages of (layer, h): encode them into one page of
        the old-token tier, or drop them."""
        k, v, pos, _ = self._take_dense(layer, h, lo, hi)
        if not self.policy.old_tiers or not len(pos):
            return
        old = self.pools[OLD]
        pid = old.alloc()
        self._write(OLD, pid, 0, k, v, (layer, h))
        old.positions[pid, : len(pos)] = pos
        old.fill[pid] = len(pos)
        self.table.push(layer, h, pid, OLD)

    # ---- rdr: budgeted allocation ---------------------------------------------------------------------

    def _dense_new_pages(self, extra_tokens: int, layers) -> int:
        """Pages the dense tier must allocate to take `extra_tokens` more per head of `layers`: what does not
        fit the free slots of their pages (append fills those first)."""
        layers = list(layers)
        if not layers or extra_tokens <= 0:
            return 0
        pool, t = self.pools[DENSE], self.table
        P = pool.page_size
        tiers = t.page_tiers[layers]  # (nl, H, max_pages)
        entry = t.entries(layers) & (tiers == DENSE)
        ids = np.where(entry, t.page_ids[layers], 0)
        free = np.where(entry, P - self.arena.fill[ids], 0).sum(axis=-1)  # (nl, H) free dense slots
        return int(np.ceil(np.maximum(extra_tokens - free, 0) / P).sum())

    def _make_room(self, layer: int, T: int) -> None:
        """Before `layer` appends T tokens: compress old tokens until its dense pages can take them. A prefill
        chunk (T > 1) leaves each layer's dense pages once the layer attended (_depart), so the budget reserves
        one layer's chunk, not every layer's; a decode step's token stays until `batch` tokens leave together,
        so layer 0 makes room for every layer's (one search per step at most, not one per layer)."""
        layers = [layer] if T > 1 else range(self.n_layers) if layer == 0 else []
        need = self._dense_new_pages(T, layers)
        if self.arena.n_free >= need:
            return
        if not self._allow_drop and self.arena.n_free + int(self._waste().sum()) >= need:
            self._reclaim(need)  # merging partly filled pages frees enough (dropping regime: a search decides)
        elif T > 1:
            rest = self.n_layers - layer - 1
            self._rebalance({}, reserve_extra=T, reserve_layers=[layer], reserve_frames=self._depart_frames * rest)
        else:
            self._rebalance({}, reserve_extra=T, reserve_frames=self._ahead_frames())

    def _old_capacity(self, extra_tokens: int, layers) -> int:
        """Frames the old tiers may use: the arena minus the dense tier's pages and what `extra_tokens` more per
        head of `layers` need."""
        return self.arena.n_frames - self.pools[DENSE].n_used - self._dense_new_pages(extra_tokens, layers)

    def _take_leaving(self, lo: int, hi: int, layers) -> dict:
        """Take positions [lo, hi) out of the dense pages of every head of `layers` (pages compacted) ->
        {layer * H + head: (k, v, pos, mass)}."""
        H = self.n_kv_heads
        leaving = {}
        for layer in layers:
            for h in range(H):
                leaving[layer * H + h] = self._take_dense(layer, h, lo, hi)
                self._compact_dense(layer, h)
                if self._look_q is not None:
                    self._note_prior(layer, h, leaving[layer * H + h][0], leaving[layer * H + h][2])
        return leaving

    def _depart(self, layer: int, T: int) -> None:
        """After `layer` attended a prefill chunk of T tokens: its tokens that leave the window by the end of
        this forward take their tiers now (`_place`), so the next layer's chunk finds the room; a search, when
        one is needed, leaves room for the remaining layers' departures (estimated as this layer's): one joint
        search per forward, not one per layer."""
        p = self.policy
        n_leave = self.offset + T - p.window - p.sinks - self.n_old
        if n_leave < self.batch:
            return
        t0 = time.perf_counter()
        lo = p.sinks + self.n_old
        leaving = self._take_leaving(lo, lo + n_leave, [layer])
        self._departed.add(layer)
        nxt = [layer + 1] if layer + 1 < self.n_layers else []
        self.allocator_seconds += time.perf_counter() - t0  # the take; _place times the rest
        self._depart_frames = self._place(leaving, T, nxt, self.n_layers - layer - 1, self._depart_frames)

    def _ahead_cap(self) -> int:
        """Most frames a decode search leaves free for the next rounds' departures."""
        return int(self.arena.n_frames * AHEAD_SHARE)

    def _ahead_frames(self) -> int:
        """Frames a decode search leaves free for the next DECODE_AHEAD rounds' departures: none while the
        allocator may drop (drops cannot be undone, so every round searches then)."""
        return 0 if self._allow_drop else min(self._round_frames * DECODE_AHEAD, self._ahead_cap())

    def _place(self, leaving: dict, reserve_extra: int, reserve_layers, ahead: int, last_frames: int,
               cap: int | None = None) -> int:
        """Tokens leaving the window ({lh: (k, v, pos, mass)}, out of the dense tier) take their tiers at the last
        search's multiplier (rdr.choose, no search) when their pages fit beside the dense reserve (as in
        `_rebalance`); otherwise, or before the first search, a joint search places them with everything else
        and also leaves room for `ahead` more such placements (at most `cap` frames; a placement that would leave
        more than `cap` frames idle searches too). -> the old-tier frames this placement added (last_frames, the
        previous one's, sizes the room before the first search)."""
        t0 = time.perf_counter()

        def search(frames: int) -> int:  # a joint search that leaves room for `ahead` placements of `frames`
            reserve = frames * ahead if cap is None else min(frames * ahead, cap)
            self._rebalance(leaving, reserve_extra=reserve_extra, reserve_layers=reserve_layers, reserve_frames=reserve)
            return frames

        if self._lam is None:
            return search(last_frames)
        lh = np.concatenate([np.full(len(x[2]), i, np.int64) for i, x in leaving.items()])
        pos = np.concatenate([x[2] for x in leaving.values()])
        mass = np.concatenate([x[3] if x[3] is not None else np.zeros(len(x[2])) for x in leaving.values()])
        cur = np.zeros(len(pos), np.int64)
        util = rdr.pool_neighbours(lh, pos, self.utilities(pos, mass, lh))
        choice = rdr.choose(lh, cur, util, self._distortion(), self._old_sizes, self.n_layers * self.n_kv_heads,
                            self._lam, self._drop_costs(), self._allow_drop)
        before, after = self._old_frames(lh, choice)
        need = after - before
        room = self._old_capacity(reserve_extra, reserve_layers) - before - need
        # search when the plan does not fit -- or, for decode rounds (cap given): when the allocator may drop (a
        # drop cannot be undone: decided by a fresh search, not a stale multiplier), or when a stale multiplier would
        # leave more than `cap` frames idle (it demotes what the free frames could hold)
        if room < 0 or (cap is not None and (self._allow_drop or (self._lam > 0 and room > cap))):
            self.allocator_seconds += time.perf_counter() - t0
            return search(need)
        self._apply(lh, cur, pos, mass, choice, {i: x[:3] for i, x in leaving.items()})
        self.allocator_seconds += time.perf_counter() - t0
        return need

    def _tier_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """-> pages, tokens (L * H, n_pools) of each (layer, head) and tier."""
        t, n_t = self.table, len(self.pools)
        L, H = self.n_layers, self.n_kv_heads
        entry = t.entries().reshape(L * H, -1)  # (L*H, max_pages)
        key = np.nonzero(entry)[0] * n_t + t.page_tiers.reshape(L * H, -1)[entry]
        fill = self.arena.fill[t.page_ids.reshape(L * H, -1)[entry]]
        pages = np.bincount(key, minlength=L * H * n_t).reshape(L * H, n_t)
        tokens = np.bincount(key, weights=fill, minlength=L * H * n_t).reshape(L * H, n_t).astype(np.int64)
        return pages, tokens

    def _old_frames(self, lh: np.ndarray, tier: np.ndarray) -> tuple[int, int]:
        """-> frames the old tiers' tokens take packed whole (what rdr.assign counts) now, and with tokens (lh,
        tier) (tiers 1..; drop = len(pools)) added."""
        tokens = self._tier_tokens()[1][:, 1:]
        added = tokens + rdr.tier_counts(lh, tier, len(self.pools) - 1, len(tokens))
        return tuple(int(np.ceil(x / self._old_sizes[None, :]).sum()) for x in (tokens, added))

    def _waste(self) -> np.ndarray:
        """-> (L * H, n_pools) frames each (layer, head) and old tier could free by merging its partly filled
        pages (pages - ceil(tokens / page size)); 0 for the dense tier."""
        pages, tokens = self._tier_tokens()
        w = pages - -(-tokens // self._sizes[None, :])
        w[:, DENSE] = 0
        return w

    def _reclaim(self, n: int) -> None:
        """Free frames until n are free (or nothing is left to merge): demotions and drops leave holes in old-tier
        pages, merged only when the frames are needed. Each merge takes the (layer, head, tier) wasting the most
        frames and re-encodes all its partly filled pages, in position order, into fresh pages (page-local
        frames fitted to them, from the codes' decoded values). (Merging only the fewest emptiest pages that
        free a frame re-encodes less but mixes distant positions in a page: dev text KL 0.0672 vs 0.0643 at 10 %,
        0.0098 vs 0.0083 at 25 %.)"""
        while self.arena.n_free < n:
            w = self._waste()
            lh, t = np.unravel_index(int(np.argmax(w)), w.shape)
            if w[lh, t] <= 0:
                return
            layer, h = divmod(int(lh), self.n_kv_heads)
            pool, items = self.pools[t], []
            i = 0
            while i < self.table.n_pages[layer, h]:
                pid = int(self.table.page_ids[layer, h, i])
                f = int(self.arena.fill[pid])
                if self.table.page_tiers[layer, h, i] != t or f == pool.page_size:
                    i += 1
                    continue
                k, v = self._read_page(t, pid, f, (layer, h))
                items.append((k, v, pool.positions[pid, :f].copy(), pool.mass[pid, :f].copy()))
                pool.free(pid)
                self.table.remove(layer, h, i)
            self._write_tokens(layer, h, t, items)  # into fresh pages, fewer than it freed

    def _alloc(self, t: int) -> int:
        """A free frame for a page of tier t (rdr: merging partly filled pages when none is free); -1 when none
        can be had for an old tier (the dense tier's room was made beforehand: the pool raises)."""
        if self.arena.n_free == 0 and self.policy.allocator == "rdr":
            self._reclaim(1)
        return self.pools[t].alloc() if self.arena.n_free or t == DENSE else -1

    def utilities(self, pos: np.ndarray, mass: np.ndarray, lh: np.ndarray | None = None) -> np.ndarray:
        """Utility of tokens at positions pos (n,) of (layer * H + head) `lh` (n,) with accumulated attention mass
        (n,). The forward in progress has observed the layers up to the last that attended, not the others. With
        lookahead, plus the attention the prompt's last queries give each token (`_prior`); the mass then counts
        only the queries after the prompt (a second pass observes nothing)."""
        layer = None if lh is None else lh // self.n_kv_heads
        prior = 0.0 if self._prior is None or lh is None else self._prior[lh, pos]
        if self.policy.utility == "mean":
            obs = np.asarray(self._obs, np.int64)
            n_obs = len(obs) - np.searchsorted(obs, pos, side="left")  # observing queries at or after pos
            if self._pending_obs and self._attended >= 0:
                pend = np.sort(np.asarray(self._pending_obs, np.int64))
                seen = np.ones(len(pos), bool) if layer is None else layer <= self._attended
                n_obs = n_obs + np.where(seen, len(pend) - np.searchsorted(pend, pos, side="left"), 0)
            return mass / np.maximum(n_obs, 1) + self._floor() * self.floor_weights(pos) + prior
        return mass.astype(np.float64) + self._floor() * self.floor_weights(pos) + prior

    def _floor(self) -> float:
        return self.policy.util_floor / max(self.offset, 1)

    def floor_weights(self, pos: np.ndarray) -> np.ndarray | float:
        """Uniform shares of utility floor of the tokens at positions pos (n,): 1 each, or with Policy.surprisal
        a = surprisal, (1 - a) + a * min(s / mean s, SURPRISAL_CAP) where s is the token's surprisal and mean s
        the mean over the tokens whose surprisal is known (the cap while a token's is not known)."""
        a = self.policy.surprisal
        if self._surprisal is None:
            return 1.0
        known = self._surprisal[: self.offset]
        known = known[~np.isnan(known)]
        mean = float(known.mean()) if len(known) else 1.0
        s = self._surprisal[pos].astype(np.float64)
        w = np.where(np.isnan(s), SURPRISAL_CAP, np.minimum(s / max(mean, 1e-6), SURPRISAL_CAP))
        return (1 - a) + a * w

    def predicted_logits(self, position: int):
        """The logits (V,) the previous forward's last token predicted for the token at `position`, or None."""
        if self._predicted is not None and self._predicted[0] == position == self.offset:
            return self._predicted[1]
        return None

    def note_surprisal(self, positions: np.ndarray, surprisal: np.ndarray, next_logits) -> None:
        """The model's forward, before advance: surprisal (T,) of its tokens at positions (T,) (NaN: unknown) and
        the logits (V,) its last token predicts for the next position."""
        self._surprisal[positions] = surprisal
        self._predicted = (int(positions[-1]) + 1, next_logits)

    def _rebalance(self, leaving: dict, reserve_extra: int = 1, reserve_layers=None, reserve_frames: int = 0) -> None:
        """Assign every token outside sinks + window -- the ones leaving now (`leaving`, taken out of the dense
        tier by _take_leaving) and the ones already in old tiers -- a tier or drop (rdr.assign), then apply:
        demote / drop, merge partly filled pages, and write the leaving tokens into their tiers; afterwards the
        dense pages of `reserve_layers` (default: every layer) can take `reserve_extra` more tokens per head, and
        `reserve_frames` more frames are free when the search can leave them (a target, not a guarantee).
        Never needs more frames than the arena has."""
        t0 = time.perf_counter()
        L, H = self.n_layers, self.n_kv_heads
        reserve_layers = range(L) if reserve_layers is None else reserve_layers
        # candidates: leaving tokens (current tier 0), in (layer, head) order, then stored old tokens
        cand_lh, cand_cur, cand_pos, cand_mass = [], [], [], []
        for lh in sorted(leaving):
            k, v, pos, mass = leaving[lh]
            cand_lh.append(np.full(len(pos), lh))
            cand_cur.append(np.zeros(len(pos), np.int64))
            cand_pos.append(pos)
            cand_mass.append(mass if mass is not None else np.zeros(len(pos)))
        leaving = {lh: x[:3] for lh, x in leaving.items()}
        t = self.table
        entry = t.entries().reshape(L * H, -1)  # (L*H, max_pages) valid entries
        e_lh, e_i = np.nonzero(entry & (t.page_tiers.reshape(L * H, -1) > 0))
        e_pid = t.page_ids.reshape(L * H, -1)[e_lh, e_i]
        e_tier = t.page_tiers.reshape(L * H, -1)[e_lh, e_i]
        for tier in range(1, len(self.pools)):
            pool, sel = self.pools[tier], e_tier == tier
            pids = e_pid[sel]
            fill = self.arena.fill[pids]
            held = np.arange(pool.page_size)[None, :] < fill[:, None]  # (n_pages, P), row-major = repeat order
            cand_lh.append(np.repeat(e_lh[sel], fill))
            cand_cur.append(np.full(int(fill.sum()), tier))
            cand_pos.append(pool.positions[pids][held])
            cand_mass.append(pool.mass[pids][held].astype(np.float64))
        lh_all = np.concatenate(cand_lh).astype(np.int64)
        cur = np.concatenate(cand_cur).astype(np.int64)
        pos = np.concatenate(cand_pos)
        mass = np.concatenate(cand_mass)
        util = rdr.pool_neighbours(lh_all, pos, self.utilities(pos, mass, lh_all))
        dist = self._distortion()  # (L*H, n_old_tiers)
        sizes = self._old_sizes
        capacity = self._old_capacity(reserve_extra, reserve_layers)
        capacity = max(capacity - reserve_frames, min(capacity, 0))  # reserve_frames: as far as dropping can
        # keep_if_fits: no drops while everything fits the cheapest tier; departures between searches follow suit
        self._allow_drop = not (self.keeps_all and rdr.all_fit_cheapest(lh_all, sizes, capacity, L * H))
        choice, self._lam = rdr.assign(lh_all, cur, util, dist, sizes, capacity, L * H, hint=self._lam,
                                       drop_cost=self._drop_costs(), allow_drop=self._allow_drop)
        self._apply(lh_all, cur, pos, mass, choice, leaving)
        self.allocator_seconds += time.perf_counter() - t0
        self.allocator_runs += 1
        need = self._dense_new_pages(reserve_extra, reserve_layers)
        self._reclaim(need)
        if self.arena.n_free < need:
            raise ContextOverflowError("KV budget allocator could not make room (internal error)")

    def _distortion(self) -> np.ndarray:
        """(L * H, n old tiers) each tier's distortion, times the head's weight."""
        L, H = self.n_layers, self.n_kv_heads
        n = len(self.pools) - 1
        d = self.policy.distortion
        if d is None:
            return np.zeros((L * H, n))
        return np.asarray(d, np.float64).reshape(L * H, n) * self._head_weight()[:, None]

    def _drop_costs(self) -> np.ndarray:
        """(L * H,) the distortion of dropping a token, times the head's weight."""
        return self.policy.drop_cost * self._head_weight()

    def _head_weight(self) -> np.ndarray:
        w = self.policy.head_weight
        n = self.n_layers * self.n_kv_heads
        return np.ones(n) if w is None else np.asarray(w, np.float64).reshape(n)

    def _apply(self, lh_all, cur, pos, mass, choice, leaving) -> None:
        """Carry out a plan: choice[i] = new tier of candidate i (1.. old tiers, len(pools) = drop)."""
        L, H = self.n_layers, self.n_kv_heads
        drop = len(self.pools)
        moves = {}  # (lh, tier) -> list of (k, v, pos, mass) to write into that tier
        # 1. take every changing stored token out of its page (best copy first); free emptied pages
        changing = (choice != cur) & (cur > 0)
        for lh in np.unique(lh_all[changing]):
            layer, h = divmod(int(lh), H)
            sel = np.nonzero(changing & (lh_all == lh))[0]
            key = cur[sel] * (1 << 32) + pos[sel]  # (tier, position) of each changing token, sorted below
            order = np.argsort(key)
            key, dest_of = key[order], choice[sel][order]
            i = 0
            while i < self.table.n_pages[layer, h]:
                t = int(self.table.page_tiers[layer, h, i])
                if t == DENSE:
                    i += 1
                    continue
                pid = int(self.table.page_ids[layer, h, i])
                pool, f = self.pools[t], int(self.arena.fill[pid])
                ppos = pool.positions[pid, :f]
                pk = t * (1 << 32) + ppos.astype(np.int64)
                j = np.minimum(np.searchsorted(key, pk), len(key) - 1)
                out = key[j] == pk
                if not out.any():
                    i += 1
                    continue
                dest = np.where(out, dest_of[j], -1)
                keep_moving = out & (dest != drop)
                if keep_moving.any():
                    k, v = self._read_page(t, pid, f, (layer, h))
                    for tgt in np.unique(dest[keep_moving]):
                        m = dest == tgt
                        moves.setdefault((int(lh), int(tgt)), []).append(
                            (k[m], v[m], ppos[m].copy(), pool.mass[pid, :f][m].astype(np.float32)))
                if not self._remove_slots(layer, h, i, pool, pid, out):
                    i += 1
        # 2. leaving tokens to their tiers
        start = 0
        order_lh = lh_all[cur == 0]
        ch0, m0 = choice[cur == 0], mass[cur == 0]
        for lh in sorted(leaving):
            k, v, p = leaving[lh]
            n = len(p)
            c, m = ch0[start : start + n], m0[start : start + n]
            assert (order_lh[start : start + n] == lh).all()
            start += n
            for tgt in np.unique(c):
                if tgt == drop:
                    continue
                sel = c == tgt
                moves.setdefault((lh, int(tgt)), []).append((k[sel], v[sel], p[sel], m[sel].astype(np.float32)))
        # 3. write the moves: into the fullest partly filled page of their (layer, head, tier), then into new pages
        # (frames from merging partly filled pages when none is free: _reclaim)
        for lh, t in sorted(moves):
            self._write_tokens(*divmod(lh, H), t, moves[(lh, t)])

    def _read_page(self, t: int, pid: int, f: int, lh) -> tuple[np.ndarray, np.ndarray]:
        """Best copy of a page's first f tokens: k, v (f, D) float32."""
        pool = self.pools[t]
        if isinstance(pool.tier, DenseTier):
            k, v = pool.tier.read(pool.data, np.array([pid]))
            return k[0, :f], v[0, :f]
        if self.use_c and t in self._ada_bits:
            ba, br = self._ada_bits[t]
            k, v = ckernels.ada_decode_pages(pool, np.array([pid]), ba[lh], br[lh])
            return k[0, :f], v[0, :f]
        return pool.tier.read_tokens(pool.data, pid, f, lh)

    def _write_tokens(self, layer: int, h: int, t: int, items: list) -> None:
        """Append tokens [(k, v, pos, mass)] to (layer, h)'s fullest partly filled page of tier t, then to new
        pages (the other partly filled pages only when no frame can be had)."""
        if not items:
            return
        pool = self.pools[t]
        P = pool.page_size
        k = np.concatenate([x[0] for x in items])
        v = np.concatenate([x[1] for x in items])
        pos = np.concatenate([x[2] for x in items])
        mass = np.concatenate([x[3] for x in items])
        order = np.argsort(pos, kind="stable")
        k, v, pos, mass = k[order], v[order], pos[order], mass[order]
        ids, tiers = self.table.pages(layer, h)
        fill = self.arena.fill[ids]
        part = np.nonzero((tiers == t) & (fill < P))[0]
        open_ = [int(ids[i]) for i in part[np.argsort(-fill[part], kind="stable")]]  # fullest first
        pid = open_.pop(0) if open_ else -1
        s = 0
        while s < len(pos):
            if pid < 0 or self.arena.fill[pid] == P:
                # a new page (fresh frame) while one can be had; else the free slots of the other partly filled
                # pages, which then suffice: the plan fits the arena with tokens packed whole (`_old_frames`)
                pid = self._alloc(t)
                if pid >= 0:
                    self.table.push(layer, h, pid, t)
                elif open_:
                    pid = open_.pop(0)
                else:
                    raise ContextOverflowError("KV budget allocator could not place tokens (internal error)")
            f = int(self.arena.fill[pid])
            n = min(P - f, len(pos) - s)
            self._write(t, pid, f, k[s : s + n], v[s : s + n], (layer, h))
            pool.positions[pid, f : f + n] = pos[s : s + n]
            pool.mass[pid, f : f + n] = mass[s : s + n]
            self.arena.fill[pid] = f + n
            s += n

    def _write(self, t: int, pid: int, f: int, k, v, lh) -> None:
        """Write n tokens (k, v (n, D) float32) at slots f.. of page pid of pool t (codecs: C when loaded)."""
        pool = self.pools[t]
        if isinstance(pool.tier, DenseTier):
            pool.tier.write(pool.data, pid, f, k, v)
        elif self.use_c and t in self._ada_bits:  # byte-identical to the NumPy codec but for last-ulp ties
            ba, br = self._ada_bits[t]
            ckernels.ada_append(pool, pid, f, k, v, ba[lh], br[lh])
        elif f == 0:
            pool.tier.write_page(pool.data, pid, k, v, lh)
        else:
            pool.tier.append(pool.data, pid, f, k, v, lh)

    # ---- reading -------------------------------------------------------------------------------------

    def attend(self, layer: int, q: np.ndarray, q_positions: np.ndarray) -> np.ndarray:
        """q: (nq, T, D) post-RoPE queries at q_positions (T,) -> (nq, T, D) attention outputs (GQA)."""
        nq, T, D = q.shape
        G = nq // self.n_kv_heads
        observe = self.track_mass and (T > 1 or self.policy.utility != "prefill")
        if self._look_until is not None and q_positions[0] < self._look_until:
            observe = False  # a lookahead's second pass: the prompt's last queries (`_prior`) stand for its queries
        n_obs = min(T, self.policy.obs) if observe else 0
        if layer == 0 and n_obs:
            self._pending_obs.extend(int(x) for x in q_positions[T - n_obs :])
        self._attended = layer
        if T == 1 and self.use_c and self._c_decode and self._look_end is None:
            out = np.empty((nq, D), dtype=np.float32)
            qc = np.ascontiguousarray(q[:, 0], dtype=np.float32)
            t = self.table
            seed = int(q_positions[0])  # the stochastic rounding seed of the slot mass (slot_mass.py)
            if len(self.pools) == 1:
                ckernels.dense_decode(qc, self.pools[DENSE], t.page_ids[layer], t.n_pages[layer], self.scale, out,
                                      with_mass=bool(n_obs), mass_seed=seed)
            else:
                key = (layer, bool(n_obs))
                if key not in self._descs:  # raw pointers into the arena and bit tables: fixed for the cache's life
                    descs = [ckernels.tier_desc(p, layer, self._ada_bits.get(i), with_mass=bool(n_obs))
                             for i, p in enumerate(self.pools)]
                    self._descs[key] = (ckernels.TierDesc * len(descs))(*descs)
                if n_obs:  # only descriptors with a mass field read the seed
                    for d in self._descs[key]:
                        d.mass_seed = seed & 0xFFFFFFFF
                ckernels.paged_decode_unchecked(ckernels.lib(), qc, self._descs[key], self.arena.fill,
                                                t.page_ids[layer], t.page_tiers[layer], t.n_pages[layer],
                                                self.scale, out)
            return out[:, None, :]
        out = np.empty_like(q)
        for h in range(self.n_kv_heads):
            qh = q[h * G : (h + 1) * G]
            scores, values, kpos, where = self._scores(layer, h, qh)
            out[h * G : (h + 1) * G] = softmax_attend(scores, values, kpos, q_positions)
            if self._look_end is not None:
                self._record_queries(layer, h, qh, scores, kpos, q_positions)
            if n_obs:
                self._add_mass(scores[:, T - n_obs :], kpos, q_positions[T - n_obs :], where)
        if self.policy.allocator == "rdr" and T > 1:
            self._depart(layer, T)
        return out

    # ---- lookahead: tiers chosen knowing the prompt's last queries (Policy.lookahead) --------------------

    def begin_lookahead(self, end: int) -> None:
        """First pass of a prompt ending at position `end`: record the post-RoPE queries of its last `obs` tokens
        and the log-sum-exp of their attention logits, per layer and query head."""
        self._look_end, self._look_rec, self._look_q = int(end), {}, None

    def end_lookahead(self, start: int, keep: bool = True) -> None:
        """After the first pass: forget its tokens (truncate to `start`, where the prompt began) and keep the
        recorded queries for the second pass (unless not `keep`: an interrupted first pass), whose tokens take
        `_prior` utility as they leave the window."""
        rec, end = self._look_rec, self._look_end
        self._look_end, self._look_rec = None, {}
        self.truncate(start)
        if keep:  # per layer: (q (nq, n, D), lse (nq, n), positions (n,)), query heads in order
            self._look_until = end
            self._look_q = {layer: (np.concatenate([np.concatenate(c, axis=1) for c in r["q"]]),
                                    np.concatenate([np.concatenate(c, axis=1) for c in r["lse"]]),
                                    np.concatenate(r["pos"]),
                                    np.array([np.concatenate(c).mean() for c in r["reach"]]))
                            for layer, r in rec.items()}

    def _record_queries(self, layer: int, h: int, q: np.ndarray, scores: np.ndarray, kpos: np.ndarray,
                        qpos: np.ndarray) -> None:
        """q (G, T, D), scores (G, T, N) of head h's query group: keep the rows of the prompt's last `obs` queries,
        the log-sum-exp of their logits, and their reach: the attention each gives tokens at distance d, weighted by
        min(d, horizon) / horizon, summed over the group. A query of the continuation, j tokens after the prompt,
        gives the prompt's tokens what these give tokens further back than j -- if the head's profile over distance
        holds -- so a head that mostly attends nearby gives the prompt little of it (Policy.horizon)."""
        rows = (qpos >= self._look_end - self.policy.obs) & (qpos < self._look_end)
        if not rows.any():
            return
        s = np.where(kpos[None, None, :] > qpos[rows][None, :, None], -np.inf, scores[:, rows])  # (G, t, N)
        lse = logsumexp(s)  # (G, t, 1)
        horizon = self.policy.horizon
        if horizon:
            far = np.clip(qpos[rows][:, None] - kpos[None, :], 0, horizon) / horizon  # (t, N)
            reach = (np.exp(s - lse) * far).sum(axis=(0, 2))  # (t,)
        else:
            reach = np.full(int(rows.sum()), float(q.shape[0]))  # no scaling: the group's whole attention
        H = self.n_kv_heads
        rec = self._look_rec.setdefault(layer, {"q": [[] for _ in range(H)], "lse": [[] for _ in range(H)],
                                                "reach": [[] for _ in range(H)], "pos": []})
        rec["q"][h].append(q[:, rows].astype(np.float32))
        rec["lse"][h].append(lse[..., 0])
        rec["reach"][h].append(reach)
        if h == 0:
            rec["pos"].append(qpos[rows].astype(np.int64))

    def _note_prior(self, layer: int, h: int, k: np.ndarray, pos: np.ndarray) -> None:
        """Tokens of (layer, h) leaving the window (keys k (n, D) float32 at positions pos (n,)): their attention
        from the prompt's last queries recorded by the first pass (none for tokens after the prompt), scaled per
        head by the share of it a continuation would still give the prompt (reach / G, `_record_queries`)."""
        if self._look_q is None or layer not in self._look_q or not len(pos):
            return
        q, lse, qpos, reach = self._look_q[layer]
        G = q.shape[0] // self.n_kv_heads
        inside = pos <= qpos[-1]  # tokens of the prompt (not generated after it)
        if not inside.any():
            return
        qg, lg = q[h * G : (h + 1) * G], lse[h * G : (h + 1) * G]  # (G, n, D), (G, n)
        s = np.einsum("gtd,jd->gtj", qg, k[inside]).astype(np.float64) * self.scale  # (G, n, m)
        w = np.exp(s - lg[..., None])
        w[:, qpos[:, None] < pos[inside][None, :]] = 0  # causal: a query does not see later tokens
        self._prior[layer * self.n_kv_heads + h, pos[inside]] = w.mean(axis=1).sum(axis=0) * (reach[h] / G)  # (m,)

    def _add_mass(self, scores: np.ndarray, kpos: np.ndarray, qpos: np.ndarray, where) -> None:
        """Add the softmax weights of the observing queries (scores (G, n_obs, N)), summed over queries and the
        G heads, to the mass of the key slots `where` lists [(pool, pids, valid (n, P))] in key order (float16
        sums, rounded stochastically with the last observing query's position as seed: slot_mass.py)."""
        s = np.where(kpos[None, None, :] > qpos[None, :, None], -np.inf, scores)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        m = p.sum(axis=(0, 1))  # (N,)
        o = 0
        for pool, pids, valid in where:
            rows, slots = np.nonzero(valid)
            ids = pids[rows]
            pool.mass[ids, slots] = slot_mass.accumulate(pool.mass[ids, slots], m[o : o + len(rows)],
                                                         slot_mass.slot_keys(ids, slots, int(qpos[-1])))
            o += len(rows)

    def _scores(self, layer: int, h: int, q: np.ndarray):
        """NumPy twin over every tier of (layer, h): q (G, T, D) -> scaled logits (G, T, N), V (N, D), pos (N,),
        and where the N keys live [(pool, pids (n,), valid (n, P))] in key order. Tiers with a `scores` method
        (ADA) compute logits from their codes; others return keys to dot with."""
        ids, tiers = self.table.pages(layer, h)
        parts, where = [], []
        for t, pool in enumerate(self.pools):
            pids = ids[tiers == t]
            if not len(pids):
                continue
            valid = np.arange(pool.page_size)[None, :] < pool.fill[pids][:, None]  # (n, P)
            pos = pool.positions[pids][valid]
            where.append((pool, pids, valid))
            if isinstance(pool.tier, DenseTier):
                k, v = pool.tier.read(pool.data, pids)
                parts.append((_logits(q, k[valid]) * np.float32(self.scale), v[valid], pos))
            elif hasattr(pool.tier, "scores") and q.shape[1] <= 8:  # decode: logits from the codes (LUT twin)
                s = pool.tier.scores(pool.data, pids, q, (layer, h), self.scale)  # (G, T, n, P)
                parts.append((s[:, :, valid], pool.tier.read_values(pool.data, pids)[valid], pos))
            elif hasattr(pool.tier, "scores"):
                # prefill chunk: the same logits as a GEMM over keys decoded transiently for this (layer, head)
                # (a (chunk x N) LUT gather costs ~50x more in NumPy; decode steps never take this path)
                if self.use_c and t in self._ada_bits:
                    ba, br = self._ada_bits[t]
                    k, v = ckernels.ada_decode_pages(pool, pids, ba[layer, h], br[layer, h])
                else:
                    k, v = pool.tier.decode_keys(pool.data, pids, (layer, h)), pool.tier.read_values(pool.data, pids)
                parts.append((_logits(q, k[valid]) * np.float32(self.scale), v[valid], pos))
            else:
                k, v = pool.tier.read(pool.data, pids)
                parts.append((_logits(q, k[valid]) * np.float32(self.scale), v[valid], pos))
        if not parts:
            G, T, D = q.shape
            return np.zeros((G, T, 0), np.float32), np.zeros((0, D), np.float32), np.zeros(0, np.int32), []
        return (np.concatenate([p[0] for p in parts], axis=-1), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]), where)

    # ---- editing -------------------------------------------------------------------------------------

    def truncate(self, n_tokens: int) -> None:
        """Forget every token at position >= n_tokens (keeps the common prefix for chat turns / regen).

        truncate(offset) removes what an interrupted forward pass appended without committing."""
        self._pending_obs = []
        self._departed = set()
        self._attended = -1
        if n_tokens > self.offset:
            return
        if n_tokens < self.offset:  # the allocator's multiplier priced what is removed (and, after a lookahead's
            # first pass, utilities of another scale): the next departure searches afresh instead of placing tokens
            # -- dropping some for good -- at a stale one
            self._lam, self._depart_frames, self._round_frames = None, 0, 0
        for layer in range(self.n_layers):
            for h in range(self.n_kv_heads):
                i = 0
                while i < self.table.n_pages[layer, h]:
                    pid = int(self.table.page_ids[layer, h, i])
                    pool = self.pools[int(self.table.page_tiers[layer, h, i])]
                    f = int(pool.fill[pid])
                    gone = pool.positions[pid, :f] >= n_tokens
                    if not (gone.any() and self._remove_slots(layer, h, i, pool, pid, gone)):
                        i += 1
        self.offset = n_tokens
        self.n_old = max(0, min(self.n_old, n_tokens - self.policy.sinks))
        self._obs = [x for x in self._obs if x < n_tokens]
        if self._surprisal is not None:
            self._surprisal[n_tokens:] = np.nan
        self._look_q = None  # the recorded queries belong to the prompt just prefilled
        self._look_until = None
        if self._prior is not None:
            self._prior[:, n_tokens:] = 0

    def reset(self) -> None:
        self.truncate(0)

    # ---- accounting ----------------------------------------------------------------------------------

    def stats(self, per_head: bool = False) -> dict:
        """Real allocations: pages in use and their bytes (frame + fill count), and the preallocated arena.
        per_head: also bytes per (layer, kv head) (L, H) and tokens per tier."""
        page = self.arena.frame_bytes + layout.FILL_BYTES
        used = sum(p.n_used for p in self.pools) * page
        dense_fp16 = self.offset * self.n_layers * self.n_kv_heads * 2 * self.head_dim * 2
        out = {
            "policy": self.policy.name,
            "tokens": self.offset,
            "n_ctx": self.n_ctx,
            "pages_used": sum(p.n_used for p in self.pools),
            "pages_total": self.arena.n_frames,
            "pages_by_tier": {p.label: p.n_used for p in self.pools},
            "page_tokens_by_tier": {p.label: p.page_size for p in self.pools},
            "bytes_used": used,
            "bytes_pool": self.arena.nbytes,
            "budget": self.budget,
            "bytes_per_token": used / self.offset if self.offset else 0.0,
            "fraction_of_fp16": used / dense_fp16 if dense_fp16 else 0.0,
        }
        if self.policy.allocator == "rdr":
            out["drops"] = "only when the cheapest tier cannot hold every token" if self.keeps_all else "by utility"
        if per_head:
            L, H = self.n_layers, self.n_kv_heads
            out["bytes_per_head"] = (self.table.n_pages.astype(np.int64) * page).tolist()
            tok = {p.label: 0 for p in self.pools}
            for layer in range(L):
                for h in range(H):
                    ids, tiers = self.table.pages(layer, h)
                    for pid, t in zip(ids, tiers):
                        tok[self.pools[t].label] += int(self.arena.fill[pid])
            out["tokens_by_tier"] = tok
        return out

    def bytes_per_token_full(self) -> int:
        """Dense payload bytes per token across all layers and heads (K and V)."""
        return self.n_layers * self.n_kv_heads * self.pools[DENSE].tier.bytes_per_token(self.head_dim)
