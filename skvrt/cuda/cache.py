"""DeviceKVCache: one sequence's KV cache with its pages on an NVIDIA GPU -- the object the model is handed on
CUDA, with PagedKVCache's interface (append / attend / advance / truncate / reset, offset, n_ctx, max_chunk,
stats).

Bookkeeping stays on the host and is PagedKVCache's own: a host PagedKVCache (`self.host`) holds the page table,
the frame arena's free list, every page's fill count and every slot's position; this object keeps the arena's
*bytes* on the device (same frames, same byte layout: skvrt/kv/pool.py, kv_write.pool_fields) plus device copies
of the fill counts and of the page table, uploaded when the host changes them. The host arena's k / v / code
bytes are never written (they stay zero); only `positions` and `fill` there are kept current.

    append    host: pages allocated and positions / fill recorded exactly as PagedKVCache.append (fifo) would;
              device: kernels_cu/dense_append.cu writes k, v (float32 -> float16) and positions
    attend    T == 1: the decode kernels (skvrt/cuda/attention.py: dense_decode for `full` / `window`,
              ada_decode over dense + ADA pages for `ada`), split-K grid sized by a power-of-two bucket of the
              longest page list; T > 1: kernels_cu/prefill_attention.cu (causal by position)
    advance   fifo policies: tokens leaving the window are taken out of the dense pages by the host's own
              PagedKVCache._take_dense (frees / compacts the host metadata); the device replays it -- the
              taken tokens' k, v gathered from their old slots, compacted slots moved -- then encodes whole ADA
              pages with kernels_cu/ada_encode.cu (`ada`) or drops them (`window`)
    truncate  host truncate; the device moves the slots of pages that lost tokens in the middle (never, in
              fifo caches: tokens leave a page from its end) and takes the new fill counts

Supported policies: DEVICE_POLICIES (float16 dense pages). The budgeted RDR policies (spherical / snapkv / h2o)
and `quant` raise InputError naming these; nothing falls back to the CPU.

Static decode steps (CUDA graphs, skvrt/cuda/graph.py): `begin_static_step` does the host part of one decode
step for every layer up front (page plan, positions, fill, table uploads into persistent device buffers), after
which append / attend only launch kernels reading those buffers, so the launches can be captured once and
replayed; `end_static_step` then advances.
"""

from __future__ import annotations

import numpy as np

from ..errors import ContextOverflowError, InputError
from ..kv.ada import AdaTier
from ..kv.cache import DENSE, OLD, PagedKVCache
from ..kv.tiers import DenseTier
from . import attention as cuda_attention
from . import kv_write
from . import prefill as cuda_prefill

DEVICE_POLICIES = ("full", "window", "ada")  # what DeviceKVCache runs (the policy names of skvrt.kv.KV_POLICIES)
MIN_BUCKET = 16  # smallest split-K bucket (table entries per head the decode grid is sized for)


def _unsupported(policy, why: str) -> InputError:
    return InputError(f"--kv-policy {policy.name} does not run on CUDA ({why}); the device KV cache supports "
                      f"{', '.join(DEVICE_POLICIES)} -- use one of those or --device cpu")


def check_policy(host: PagedKVCache) -> None:
    """InputError unless the device cache can run this host cache's policy and storage."""
    p = host.policy
    if p.allocator != "fifo":
        raise _unsupported(p, f"its {p.allocator} allocator has no GPU implementation")
    dense = host.pools[DENSE].tier
    if not isinstance(dense, DenseTier) or dense.dtype != "float16":
        raise _unsupported(p, f"dense pages must be float16 on the GPU, not {getattr(dense, 'dtype', dense)}")
    for t in p.old_tiers:
        if not isinstance(t, AdaTier):
            raise _unsupported(p, f"tier {t.name} has no GPU kernel")
    if host.pools[DENSE].page_size > 256 or any(pool.page_size > 256 for pool in host.pools):
        raise _unsupported(p, "pages of more than 256 tokens")


class DeviceKVCache:
    def __init__(self, host: PagedKVCache, module, xp):
        check_policy(host)
        self.host, self.module, self.xp = host, module, xp
        L, H = host.n_layers, host.n_kv_heads
        t = host.table
        self.buf = xp.zeros(host.arena.buf.size, np.uint8)  # the arena's bytes on the device
        self.fill_d = xp.zeros(host.arena.n_frames, np.int32)
        self.fields = [kv_write.pool_fields(xp, pool, self.buf) for pool in host.pools]
        self.ids_d = xp.array(t.page_ids, copy=True)  # (L, H, max_pages)
        self.tiers_d = xp.array(t.page_tiers, copy=True)
        self.npages_d = xp.array(t.n_pages, copy=True)  # (L, H)
        self._dirty = set(range(L))  # layers whose device table is stale
        self._bits = {}  # pool index -> per layer (angle bits, radius bits) (H, D/2) uint8 on the device
        for i, pool in enumerate(host.pools):
            if isinstance(pool.tier, AdaTier):
                ba, br = pool.tier.widths_at()
                self._bits[i] = [(xp.asarray(np.ascontiguousarray(ba[layer], np.uint8)),
                                  xp.asarray(np.ascontiguousarray(br[layer], np.uint8))) for layer in range(L)]
        self._ktiers = [self._kernel_tiers(layer) for layer in range(L)]
        self._positions = [f["positions"] for f in self.fields]
        self._decode = {}  # (layer, bucket) -> (q buffer, out buffer, attention.Launch)
        self._last = None  # (L, H) last dense page per (layer, head), or None: recompute (_last_dense)
        self._static = None  # static-step buffers (enable_static)
        self._in_static = False
        self._pending_advance = 0

    # ---- what the model and the generation loop read ---------------------------------------------------

    offset = property(lambda self: self.host.offset)
    n_ctx = property(lambda self: self.host.n_ctx)
    max_chunk = property(lambda self: self.host.max_chunk)
    policy = property(lambda self: self.host.policy)
    n_layers = property(lambda self: self.host.n_layers)
    n_kv_heads = property(lambda self: self.host.n_kv_heads)
    head_dim = property(lambda self: self.host.head_dim)
    scale = property(lambda self: self.host.scale)
    table = property(lambda self: self.host.table)
    pools = property(lambda self: self.host.pools)
    arena = property(lambda self: self.host.arena)
    budget = property(lambda self: self.host.budget)

    def stats(self, per_head: bool = False) -> dict:
        return self.host.stats(per_head)

    def bytes_per_token_full(self) -> int:
        return self.host.bytes_per_token_full()

    @property
    def device_bytes(self) -> int:
        """Device memory of the cache: arena bytes + fill + table copies."""
        return int(self.buf.nbytes + self.fill_d.nbytes + self.ids_d.nbytes + self.tiers_d.nbytes + self.npages_d.nbytes)

    # ---- device views ----------------------------------------------------------------------------------

    def _kernel_tiers(self, layer: int) -> list:
        xp, out = self.xp, []
        for i, (pool, f) in enumerate(zip(self.host.pools, self.fields)):
            if isinstance(pool.tier, AdaTier):
                ba, br = pool.tier.widths_at(layer)
                out.append(cuda_attention.ada_tier(xp, f, ba, br, pool.tier.v_bits, pool.tier.v_group))
            else:
                out.append(cuda_attention.dense_tier(xp, f["k"], f["v"]))
        return out

    def _put(self, dst, src) -> None:
        """Host array -> the device array dst (same shape), in place."""
        dst[...] = self.xp.asarray(np.ascontiguousarray(src))

    def _sync_tables(self) -> None:
        t = self.host.table
        if not self._dirty:
            return
        if len(self._dirty) == self.host.n_layers:
            self._put(self.ids_d, t.page_ids)
            self._put(self.tiers_d, t.page_tiers)
        else:
            for layer in sorted(self._dirty):
                self._put(self.ids_d[layer], t.page_ids[layer])
                self._put(self.tiers_d[layer], t.page_tiers[layer])
        self._put(self.npages_d, t.n_pages)
        self._dirty.clear()

    def _sync_fill(self, pids=None) -> None:
        """Device fill <- host fill (all frames, or the frames pids)."""
        fill = self.host.arena.fill
        if pids is None:
            self._put(self.fill_d, fill)
        elif len(pids):
            pids = np.unique(np.asarray(pids, np.int64))
            self.fill_d[self.xp.asarray(pids)] = self.xp.asarray(fill[pids])

    def bucket(self) -> int:
        """Table entries per head the decode grid is sized for: a power of two >= the longest page list."""
        used = int(self.host.table.n_pages.max()) if self.host.table.n_pages.size else 0
        b = MIN_BUCKET
        while b < used:
            b *= 2
        return min(b, self.host.table.max_pages)

    # ---- writing -------------------------------------------------------------------------------------

    def _plan(self, layer: int, T: int) -> tuple[np.ndarray, np.ndarray]:
        """PagedKVCache.append's (fifo) page allocation for T new tokens of `layer`, with the positions and fill
        counts recorded on the host -> page ids, slots (H, T) int32."""
        host = self.host
        pool, table = host.pools[DENSE], host.table
        P, H = pool.page_size, host.n_kv_heads
        pos = np.arange(host.offset, host.offset + T, dtype=np.int32)
        pids, slots = np.empty((H, T), np.int32), np.empty((H, T), np.int32)
        pushed = False
        for h in range(H):
            idx = table.last(layer, h, DENSE)
            t = 0
            if idx >= 0:
                pid = int(table.page_ids[layer, h, idx])
                f = int(pool.fill[pid])
                n = min(P - f, T)
                if n > 0:
                    pids[h, :n], slots[h, :n] = pid, np.arange(f, f + n)
                    pool.positions[pid, f : f + n] = pos[:n]
                    pool.fill[pid] = f + n
                    t = n
            while t < T:
                pid = pool.alloc()  # host fill 0, positions -1
                table.push(layer, h, pid, DENSE)
                pushed = True
                n = min(P, T - t)
                pids[h, t : t + n], slots[h, t : t + n] = pid, np.arange(n)
                pool.positions[pid, :n] = pos[t : t + n]
                pool.fill[pid] = n
                t += n
        if pushed:
            self._dirty.add(layer)
            self._last = None
        return pids, slots

    def _last_dense(self) -> np.ndarray:
        """(L, H) page id of each (layer, head)'s last dense table entry (-1: none), what append continues;
        recomputed from the table after every change the decode plan does not make itself."""
        if self._last is None:
            t = self.host.table
            M = t.max_pages
            mask = (t.page_tiers == DENSE) & (np.arange(M) < t.n_pages[..., None])
            idx = M - 1 - np.argmax(mask[..., ::-1], axis=-1)
            self._last = np.where(mask.any(-1), np.take_along_axis(t.page_ids, idx[..., None], -1)[..., 0], -1)
        return self._last

    def _plan_decode(self) -> tuple[np.ndarray, np.ndarray]:
        """_plan for one token of every layer at once, vectorised over (layer, head) (a decode step's host work
        must not grow with L x H Python iterations) -> page ids, slots (L, H, 1) int32."""
        host = self.host
        pool, table = host.pools[DENSE], host.table
        P = pool.page_size
        last = self._last_dense()
        pid = last.astype(np.int64)
        f = np.where(pid >= 0, pool.fill[np.maximum(pid, 0)], P)
        for layer, h in zip(*np.nonzero(f >= P)):  # a new page: once every P steps per (layer, head)
            new = pool.alloc()
            table.push(layer, h, new, DENSE)
            pid[layer, h], f[layer, h] = new, 0
            last[layer, h] = new
            self._dirty.add(int(layer))
        pool.positions[pid, f] = host.offset
        pool.fill[pid] = f + 1
        return pid.astype(np.int32)[..., None], f.astype(np.int32)[..., None]

    def _check_room(self, T: int) -> None:
        host = self.host
        if host.offset + T > host.n_ctx:
            raise ContextOverflowError(f"context full: {host.offset} cached + {T} new tokens > n_ctx {host.n_ctx}")
        if not host.policy.keep_all and T > host.max_chunk:
            raise ValueError(f"forward chunks must be <= {host.max_chunk} tokens under the {host.policy.name} policy")

    def append(self, layer: int, k, v) -> None:
        """k, v (H, T, D) float32 device arrays (any strides, contiguous last axis), post-RoPE, of the T tokens at
        positions offset .. offset + T - 1."""
        H, T, _ = k.shape
        f0 = self.fields[DENSE]
        if self._in_static:
            s = self._static
            kv_write.dense_append(self.module, self.xp, k, v, s["pids"][layer], s["slots"][layer], f0["k"], f0["v"],
                                  f0["positions"], self.fill_d, 0, positions=s["pos"])
            return
        self._check_room(T)
        pids, slots = self._plan(layer, T)
        self._sync_fill(pids.ravel())
        xp = self.xp
        kv_write.dense_append(self.module, xp, k, v, xp.asarray(pids), xp.asarray(slots), f0["k"], f0["v"],
                              f0["positions"], self.fill_d, self.host.offset)

    # ---- reading -------------------------------------------------------------------------------------

    def _decode_launch(self, layer: int, bucket: int):
        key = (layer, bucket)
        if key not in self._decode:
            xp, host = self.xp, self.host
            nq = host.n_kv_heads * self._group
            D = host.head_dim
            qb, ob = xp.zeros((nq, D), np.float32), xp.zeros((nq, D), np.float32)
            ids, n = self.ids_d[layer], self.npages_d[layer]
            if len(host.pools) == 1:
                f = self.fields[DENSE]
                launch = cuda_attention.prepare_dense_decode(self.module, xp, qb, f["k"], f["v"], self.fill_d, ids, n,
                                                             host.scale, ob, max_pages_used=bucket)
            else:
                launch = cuda_attention.prepare_ada_decode(self.module, xp, qb, self._ktiers[layer], self.fill_d, ids,
                                                           self.tiers_d[layer], n, host.scale, ob,
                                                           max_pages_used=bucket)
            self._decode[key] = (qb, ob, launch)
        return self._decode[key]

    def attend(self, layer: int, q, q_positions=None):
        """q (nq, T, D) float32 device array (post-RoPE, heads of a token contiguous: e.g. a view of the q|k|v
        rows) at positions offset .. offset + T - 1 (the tokens just appended) -> (nq, T, D) attention outputs."""
        nq, T, D = q.shape
        self._group = nq // self.host.n_kv_heads
        xp = self.xp
        if T == 1:
            if not self._in_static:
                self._sync_tables()
            qb, ob, launch = self._decode_launch(layer, self._static["bucket"] if self._in_static else self.bucket())
            qb[...] = q[:, 0]
            launch()
            return ob[:, None, :]
        self._sync_tables()
        host = self.host
        qt = q.transpose(1, 0, 2)  # (T, nq, D)
        if qt.strides[2] != 4 or qt.strides[1] != 4 * D:
            qt = xp.ascontiguousarray(qt)
        out = xp.empty((T, nq, D), np.float32)
        qpos = xp.asarray(np.arange(host.offset, host.offset + T, dtype=np.int32))
        ids, tiers, n = self.ids_d[layer], self.tiers_d[layer], self.npages_d[layer]
        cuda_prefill.prefill_attention(self.module, xp, qt, qpos, self._ktiers[layer], self._positions, self.fill_d,
                                       ids, tiers if len(host.pools) > 1 else None, n, host.scale, out)
        return out.transpose(1, 0, 2)

    # ---- advancing: fifo policies move tokens out of the window --------------------------------------

    def advance(self, n_tokens: int) -> None:
        if self._in_static:  # deferred to end_static_step (not part of the captured launches)
            self._pending_advance += n_tokens
            return
        host = self.host
        host.offset += n_tokens
        p = host.policy
        if p.keep_all:
            return
        while host.offset - p.window - p.sinks - host.n_old >= host.batch:
            lo = p.sinks + host.n_old
            self._move_round(lo, lo + host.batch)
            host.n_old += host.batch

    @staticmethod
    def _slots_of(pool, pids):
        """Every valid slot of pages pids -> (pid, slot, position) arrays, page by page."""
        P = pool.page_size
        f = pool.fill[pids].astype(np.int64)
        valid = np.arange(P)[None, :] < f[:, None]
        return (np.repeat(pids, f).astype(np.int64), np.nonzero(valid)[1].astype(np.int64),
                pool.positions[pids][valid].astype(np.int64))

    def _move_round(self, lo: int, hi: int) -> None:
        """PagedKVCache._move_old for every (layer, head): positions [lo, hi) leave the dense pages (host
        bookkeeping by the host cache itself), then the device gathers them, compacts what stays and encodes
        one ADA page per (layer, head) (or drops them)."""
        host, xp = self.host, self.xp
        L, H = host.n_layers, host.n_kv_heads
        dense = host.pools[DENSE]
        take_pid, take_slot, moves, jobs = [], [], [], []  # jobs: (layer, h, new pid, n)
        new_pos = []
        for layer in range(L):
            for h in range(H):
                ids, tiers = host.table.pages(layer, h)
                dp = ids[tiers == DENSE].copy()
                b_pid, b_slot, b_pos = self._slots_of(dense, dp)
                order = np.argsort(b_pos, kind="stable")
                _, _, pos, _ = host._take_dense(layer, h, lo, hi)  # host: frees emptied pages, compacts the rest
                if len(pos):
                    src = order[np.searchsorted(b_pos[order], pos.astype(np.int64))]
                    take_pid.append(b_pid[src])
                    take_slot.append(b_slot[src])
                ids, tiers = host.table.pages(layer, h)
                a_pid, a_slot, a_pos = self._slots_of(dense, ids[tiers == DENSE])
                src = order[np.searchsorted(b_pos[order], a_pos)]
                moved = b_slot[src] != a_slot
                if moved.any():
                    moves.append((a_pid[moved], b_slot[src][moved], a_slot[moved]))
                if host.policy.old_tiers and len(pos):
                    old = host.pools[OLD]
                    pid = old.alloc()
                    old.positions[pid, : len(pos)] = pos
                    old.fill[pid] = len(pos)
                    host.table.push(layer, h, pid, OLD)
                    jobs.append((layer, h, pid, len(pos)))
                    new_pos.append(pos.astype(np.int32))
        f0 = self.fields[DENSE]
        # 1. gather the leaving tokens before anything is overwritten (freed frames may be reused below)
        if take_pid and jobs:
            tp, ts = xp.asarray(np.concatenate(take_pid)), xp.asarray(np.concatenate(take_slot))
            k_all, v_all = f0["k"][tp, ts].astype(np.float32), f0["v"][tp, ts].astype(np.float32)
        # 2. compaction of the pages that keep some tokens: gather every moved slot, then scatter
        if moves:
            mp, ms, md = (xp.asarray(np.concatenate(x)) for x in zip(*moves))
            for name in ("k", "v", "positions"):
                vals = f0[name][mp, ms]
                f0[name][mp, md] = vals
        # 3. whole ADA pages, one kernel launch per layer (a job per kv head)
        if jobs:
            pool = host.pools[OLD]
            fo = self.fields[OLD]
            D = host.head_dim
            o = 0
            for layer in range(L):
                mine = [j for j in jobs if j[0] == layer]
                if not mine:
                    continue
                ns = np.array([j[3] for j in mine])
                n_max, total = int(ns.max()), int(ns.sum())
                dest = xp.asarray(np.concatenate([i * n_max + np.arange(n) for i, n in enumerate(ns)]))
                kb = xp.zeros((len(mine) * n_max, D), np.float32)
                vb = xp.zeros((len(mine) * n_max, D), np.float32)
                kb[dest], vb[dest] = k_all[o : o + total], v_all[o : o + total]
                kb, vb = kb.reshape(len(mine), n_max, D), vb.reshape(len(mine), n_max, D)
                o += total
                jb = xp.asarray(np.array([(pid, n, h) for _, h, pid, n in mine], np.int32))
                ba, br = self._bits[OLD][layer]
                kv_write.ada_encode_pages(self.module, xp, kb, vb, jb, ba, br, fo, pool.tier.v_bits, pool.tier.v_group)
            pids = np.concatenate([np.full(n, pid, np.int64) for _, _, pid, n in jobs])
            slots = np.concatenate([np.arange(n) for _, _, _, n in jobs])
            fo["positions"][xp.asarray(pids), xp.asarray(slots)] = xp.asarray(np.concatenate(new_pos))
        self._sync_fill()
        self._dirty.update(range(L))
        self._last = None

    # ---- editing -------------------------------------------------------------------------------------

    def truncate(self, n_tokens: int) -> None:
        """Forget every token at position >= n_tokens (PagedKVCache.truncate; the device follows)."""
        host, xp = self.host, self.xp
        if n_tokens > host.offset:
            return
        moves = {}  # pool index -> [(pid, src slots, dst slots)] for pages losing tokens in the middle
        t = host.table
        for layer in range(host.n_layers):
            for h in range(host.n_kv_heads):
                ids, tiers = t.pages(layer, h)
                for pid, ti in zip(ids, tiers):
                    pool = host.pools[int(ti)]
                    f = int(pool.fill[pid])
                    gone = pool.positions[pid, :f] >= n_tokens
                    keep = np.nonzero(~gone)[0]
                    if gone.any() and len(keep) and (keep != np.arange(len(keep))).any():
                        moves.setdefault(int(ti), []).append((np.full(len(keep), pid), keep, np.arange(len(keep))))
        host.truncate(n_tokens)
        for ti, ms in moves.items():
            fields = self.fields[ti]
            mp, src, dst = (xp.asarray(np.concatenate(x)) for x in zip(*ms))
            for name in (*host.pools[ti].tier.per_slot, "positions"):
                vals = fields[name][mp, src]
                fields[name][mp, dst] = vals
        self._sync_fill()
        self._dirty.update(range(host.n_layers))
        self._last = None

    def reset(self) -> None:
        self.truncate(0)

    # ---- static decode steps (CUDA graphs) ---------------------------------------------------------

    def enable_static(self) -> None:
        """Allocate the persistent buffers a captured decode step reads: the append plan (L, H, 1) and the
        position (1,)."""
        if self._static is None:
            xp, L, H = self.xp, self.host.n_layers, self.host.n_kv_heads
            self._static = {"pids": xp.zeros((L, H, 1), np.int32), "slots": xp.zeros((L, H, 1), np.int32),
                            "pos": xp.zeros(1, np.int32), "bucket": None}

    def begin_static_step(self) -> int:
        """The host part of one decode step (T = 1) for every layer: page plan, positions and fill on the host,
        uploaded into the static buffers, tables synced -> the split-K bucket of this step (a captured step is
        valid for one bucket)."""
        self.enable_static()
        self._check_room(1)
        s = self._static
        pids, slots = self._plan_decode()
        self._put(s["pids"], pids)
        self._put(s["slots"], slots)
        self._put(s["pos"], np.array([self.host.offset], np.int32))
        self._sync_fill(pids.ravel())
        self._sync_tables()
        s["bucket"] = self.bucket()
        self._in_static = True
        return s["bucket"]

    def end_static_step(self) -> None:
        self._in_static = False
        n, self._pending_advance = self._pending_advance, 0
        self.advance(n)
