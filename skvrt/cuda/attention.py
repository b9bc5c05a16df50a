"""Decode attention over paged KV on an NVIDIA GPU: the launch code of kernels_cu/dense_decode.cu and
kernels_cu/ada_decode.cu (grid layout, shapes and the split-K scheme are written there and in
kernels_cu/decode_common.cuh). GPU twins of skvrt.ckernels dense_decode / paged_decode.

Every op takes `module`, a factory (kernels_cu stem, defines) -> module with get_function
(skvrt.cuda.loader.cupy_module on a GPU, skvrt.cuda.emu.factory(order) in the CPU tests), and `xp`, the array
module of the arrays (cupy; numpy under the emulator), so one launch code runs in both places. Storage is
read as the frame arena lays it out (skvrt/kv/pool.py): a tier's field arrays are (N, ...) views whose
leading stride is the frame size; the rest of each field is C-contiguous. Before every launch the dtype,
shape, strides and alignment of each array are checked (a RawKernel checks nothing); page-table values are
the caller's contract (skvrt/kv/pages.py).

Attention mass (for RDR utilities), when asked: `page_mass` (H, max_pages) <- per table entry, the softmax
weights of its tokens summed over the G query heads; and every tier whose `mass` field is given (the pool's
(N, P) float16 slot mass) gets each slot's weight added with stochastic rounding (seed `mass_seed` of the
tier: skvrt/kv/slot_mass.py), as the C kernels do.

Limits (ValueError before any launch): head_dim 64 / 128 / 256; G = nq / H in 1..16; pages of 16..256
tokens (a dense-only table: any page size <= 256, at least 1); float16 dense pages. ADA tiers: field widths
<= 12 bits each and within key_bytes, v_bits 2 / 4 / 8, v_group a multiple of 8 dividing head_dim,
LUT + codes <= MAX_DYNAMIC_SMEM bytes of shared memory.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

NT = 128  # threads per block (dec::NT)
DEFAULT_SMEM = 48 * 1024  # dynamic shared memory a launch may use without opting in
# fits next to the kernels' static shared memory (<= 38 KiB) on every sm_80+ GPU (opt-in limit 163 KiB on sm_80)
MAX_DYNAMIC_SMEM = 120 * 1024
TARGET_BLOCKS = 256  # split-K: aim for about this many partial blocks per launch (2 waves on ~130 SMs)
KIND_DENSE, KIND_ADA = 0, 2  # kernels_c's tier kinds (1, dense float32, has no GPU kernel)
_FIELDS = ("k", "v", "codes", "frame", "v_codes", "v_min", "v_scale", "mass", "angle_bits", "radius_bits")
# == struct dec::TierDesc in kernels_cu/decode_common.cuh
TIER_DESC = np.dtype([("kind", np.int32), ("page_size", np.int32), ("stride", np.int64)]
                     + [(n, np.uint64) for n in _FIELDS]
                     + [(n, np.int32) for n in ("key_bytes", "v_bits", "v_group")] + [("mass_seed", np.uint32)])
assert TIER_DESC.itemsize == 112


def _ptr(a) -> int:
    return a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data  # cupy, numpy


def _check(xp, name: str, a, shape: tuple, dtype, align: int = 4, page_stride: int | None = None) -> None:
    """C-contiguous `shape` `dtype`; with page_stride: (N, ...) whose pages are page_stride bytes apart and
    C-contiguous inside (a field of an arena pool)."""
    if not isinstance(a, xp.ndarray):
        raise TypeError(f"{name}: expected a {xp.__name__}.ndarray, got {type(a).__name__}")
    if a.dtype != dtype or a.shape != tuple(shape):
        raise ValueError(f"{name}: expected {tuple(shape)} {np.dtype(dtype).name}, got {a.shape} {a.dtype}")
    inner = tuple(int(np.prod(shape[i + 1 :], dtype=np.int64)) * a.itemsize for i in range(1, len(shape)))
    if page_stride is None and not a.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    if page_stride is not None and (a.strides[0] != page_stride or tuple(a.strides[1:]) != inner):
        raise ValueError(f"{name}: strides {a.strides}, expected ({page_stride}, C-contiguous inside a page)")
    if _ptr(a) % align or (page_stride or 0) % align:
        raise ValueError(f"{name}: pages must be {align}-byte aligned")


def _shapes(xp, q, page_ids, n_pages, out, page_mass) -> tuple[int, int, int, int]:
    """Validate what both ops share -> (H, G, D, max_pages)."""
    if q.ndim != 2 or page_ids.ndim != 2:
        raise ValueError(f"q must be (nq, D) and page_ids (H, max_pages), got {q.shape}, {page_ids.shape}")
    (nq, D), (H, max_pages) = q.shape, page_ids.shape
    if D not in (64, 128, 256):
        raise ValueError(f"head_dim {D} not supported by the CUDA decode kernels (64, 128 or 256)")
    if nq % H or not 1 <= nq // H <= 16:
        raise ValueError(f"{nq} query heads over {H} KV heads: the group size must be an integer in 1..16")
    _check(xp, "q", q, (nq, D), np.float32)
    _check(xp, "page_ids", page_ids, (H, max_pages), np.int32)
    _check(xp, "n_pages", n_pages, (H,), np.int32)
    _check(xp, "out", out, (nq, D), np.float32, 16)
    if page_mass is not None:
        _check(xp, "page_mass", page_mass, (H, max_pages), np.float32)
    return H, nq // H, D, max_pages


def _max_page(tiers: list["Tier"]) -> int:
    P = max(t.page_size for t in tiers)
    if P > 256:
        raise ValueError(f"pages of {P} tokens: the CUDA decode kernels take at most 256")
    return max(16, P)


def _split(H: int, max_pages: int, max_pages_used: int | None, pages_per_split: int | None) -> tuple[int, int]:
    """-> (pages per split, number of splits S)."""
    used = max_pages if max_pages_used is None else max_pages_used
    if not 0 <= used <= max_pages:
        raise ValueError(f"max_pages_used {used} outside 0..{max_pages}")
    pps = pages_per_split or max(1, math.ceil(used * H / TARGET_BLOCKS))
    return pps, max(1, math.ceil(used / pps))


@dataclasses.dataclass(frozen=True)
class Tier:
    """One tier of the arena as the kernels read it (a TierDesc): its field arrays (N, ...) on the device,
    pages `stride` bytes apart, and host-side sizes. Build with dense_tier / ada_tier."""

    kind: int
    page_size: int
    stride: int
    arrays: dict            # field name (TierDesc's) -> xp array
    key_bytes: int = 0
    v_bits: int = 0
    v_group: int = 0
    lut_entries: int = 0    # ADA: max over heads of sum_i 2^angle_bits[h, i], the length of one head's LUT
    mass_seed: int = 0      # slot mass: the stochastic rounding seed (the observing query's position)


def dense_tier(xp, k, v, mass=None, mass_seed: int = 0) -> Tier:
    """k, v (N, P, D) float16 (a dense pool's data["k"], ["v"]); mass (N, P) float16 or None (pool.mass):
    the slot mass to add to, rounded stochastically with mass_seed."""
    N, P, D = k.shape
    stride = k.strides[0]
    _check(xp, "k", k, (N, P, D), np.float16, 16, stride)
    _check(xp, "v", v, (N, P, D), np.float16, 16, stride)
    if mass is not None:
        _check(xp, "mass", mass, (N, P), np.float16, 2, stride)
    arrays = {"k": k, "v": v} | ({"mass": mass} if mass is not None else {})
    return Tier(KIND_DENSE, P, stride, arrays, mass_seed=int(mass_seed) & 0xFFFFFFFF)


def ada_tier(xp, data: dict, angle_bits: np.ndarray, radius_bits: np.ndarray, v_bits: int, v_group: int,
             mass=None, mass_seed: int = 0) -> Tier:
    """data: an ADA pool's arrays by name (codes, frame, v_codes, v_min, v_scale) as xp arrays; angle_bits,
    radius_bits: host (H, D/2) widths of one layer = ada.tier.widths_at(layer); mass, mass_seed as
    in dense_tier."""
    ab, rb = (np.ascontiguousarray(b, dtype=np.uint8) for b in (angle_bits, radius_bits))
    codes = data["codes"]
    N, P, key_bytes = codes.shape
    D = 2 * ab.shape[-1]
    if ab.shape != rb.shape or ab.ndim != 2:
        raise ValueError(f"angle_bits / radius_bits must both be (H, D/2), got {ab.shape}, {rb.shape}")
    if max(int(ab.max()), int(rb.max())) > 12:
        raise ValueError("ADA field widths must be <= 12 bits")
    if int((ab.astype(np.int64) + rb).sum(-1).max()) > 8 * key_bytes:
        raise ValueError(f"ADA field widths spend more than the {8 * key_bytes} key bits of a token")
    if v_bits not in (2, 4, 8) or v_group % 8 or D % v_group:
        raise ValueError(f"ADA v_bits {v_bits} / v_group {v_group} not supported (v_bits 2, 4 or 8; v_group a "
                         f"multiple of 8 dividing {D})")
    stride, ng = codes.strides[0], D // v_group
    for name, shape, dt, align in (("codes", (N, P, key_bytes), np.uint8, 4),
                                   ("frame", (N, D // 2, 4), np.float16, 8),
                                   ("v_codes", (N, P, D * v_bits // 8), np.uint8, 8),
                                   ("v_min", (N, P, ng), np.float16, 2),
                                   ("v_scale", (N, P, ng), np.float16, 2)):
        _check(xp, f"ADA {name}", data[name], shape, dt, align, stride)
    if mass is not None:
        _check(xp, "mass", mass, (N, P), np.float16, 2, stride)
    arrays = {n: data[n] for n in ("codes", "frame", "v_codes", "v_min", "v_scale")}
    arrays |= {"angle_bits": xp.asarray(ab), "radius_bits": xp.asarray(rb)} | ({"mass": mass} if mass is not None else {})
    return Tier(KIND_ADA, P, stride, arrays, key_bytes, int(v_bits), int(v_group),
                int((1 << ab.astype(np.int64)).sum(-1).max()), int(mass_seed) & 0xFFFFFFFF)


def _descs(xp, tiers: list[Tier]):
    """The TierDesc array on the device, as bytes (n_tiers * 112,); stream-ordered, freed after the launch."""
    desc = np.zeros(len(tiers), TIER_DESC)
    for d, t in zip(desc, tiers):
        d["kind"], d["page_size"], d["stride"] = t.kind, t.page_size, t.stride
        for name, a in t.arrays.items():
            d[name] = _ptr(a)
        d["key_bytes"], d["v_bits"], d["v_group"], d["mass_seed"] = t.key_bytes, t.v_bits, t.v_group, t.mass_seed
    return xp.asarray(desc.view(np.uint8))


def ada_smem_bytes(G: int, P: int, lut_entries: int, key_bytes: int) -> int:
    """Dynamic shared memory of ada_decode_partial: (G, E) float LUT + (P, key_bytes) codes + (E,) pair map."""
    return -(-(4 * G * lut_entries + P * key_bytes + lut_entries) // 16) * 16


class Launch:
    """The kernel launches of one decode op with every buffer allocated and every check done: calling it only
    launches (no allocation, no host-device copy), so it can be captured in a CUDA graph and replayed; the
    buffers it holds (q, out, page tables, workspaces) are read / written in place by every call."""

    def __init__(self, calls: list, keep: list):
        self.calls, self._keep = calls, keep  # keep: arrays whose device pointers the calls hold

    def __call__(self) -> None:
        for fn, grid, block, args, smem in self.calls:
            fn(grid, block, args, shared_mem=smem)


def _prepare(module, xp, name: str, q, tiers: list[Tier], fill, page_ids, page_tiers, n_pages, scale: float, out,
             page_mass, max_pages_used, pages_per_split) -> Launch:
    H, G, D, max_pages = _shapes(xp, q, page_ids, n_pages, out, page_mass)
    _check(xp, "fill", fill, fill.shape[:1], np.int32)
    if page_tiers is not None:
        _check(xp, "page_tiers", page_tiers, (H, max_pages), np.int8, 1)
    P = _max_page(tiers)
    pps, S = _split(H, max_pages, max_pages_used, pages_per_split)
    mod = module(name, {"HEAD_DIM": D, "GQA": G, "MAX_PAGE": P})
    f32 = np.float32
    part_acc, part_ml = xp.empty((H, S, G, D), f32), xp.empty((H, S, G, 2), f32)
    with_mass = page_mass is not None or any("mass" in t.arrays for t in tiers)
    slot_w = xp.empty((H, max_pages, G, P), f32) if with_mass else None
    page_m = xp.empty((H, max_pages, G), f32) if with_mass else None
    descs = _descs(xp, tiers)
    tail = (n_pages, np.int32(max_pages), np.int32(pps), np.float32(scale))
    calls = []
    if name == "dense_decode":
        t = tiers[0]
        calls.append((mod.get_function("dense_decode_partial"), (S, H), (NT,),
                      (q, t.arrays["k"], t.arrays["v"], np.int64(t.stride), fill, page_ids, *tail,
                       part_acc, part_ml, slot_w, page_m), 0))
    else:
        ada = [t for t in tiers if t.kind == KIND_ADA]
        lut_len = max((t.lut_entries for t in ada), default=0)
        kb_max = max((t.key_bytes for t in ada), default=0)
        smem = ada_smem_bytes(G, P, lut_len, kb_max)
        if smem > MAX_DYNAMIC_SMEM:
            raise ValueError(f"ADA LUT of {lut_len} entries x {G} query heads needs {smem} bytes of shared "
                             f"memory (> {MAX_DYNAMIC_SMEM}): fewer angle bits per pair")
        fn = mod.get_function("ada_decode_partial")
        if smem > DEFAULT_SMEM:
            fn.max_dynamic_shared_size_bytes = smem
        calls.append((fn, (S, H), (NT,), (q, descs, fill, page_ids, page_tiers, *tail, np.int32(lut_len),
                                          np.int32(kb_max), part_acc, part_ml, slot_w, page_m), smem))
    calls.append((mod.get_function("decode_combine"), (H,), (NT,),
                  (part_acc, part_ml, slot_w, page_m, descs, page_ids, page_tiers, fill, n_pages, np.int32(S),
                   np.int32(max_pages), out, page_mass), 0))
    keep = [t.arrays for t in tiers]
    return Launch(calls, keep)


def _run(*args) -> None:
    _prepare(*args)()


def prepare_dense_decode(module, xp, q, k, v, fill, page_ids, n_pages, scale: float, out, *, slot_mass=None,
                         page_mass=None, max_pages_used: int | None = None,
                         pages_per_split: int | None = None, mass_seed: int = 0) -> Launch:
    """dense_decode's launches, prepared once (arguments as dense_decode); call the result to run a step."""
    return _prepare(module, xp, "dense_decode", q, [dense_tier(xp, k, v, slot_mass, mass_seed)], fill, page_ids,
                    None, n_pages, scale, out, page_mass, max_pages_used, pages_per_split)


def prepare_ada_decode(module, xp, q, tiers: list[Tier], fill, page_ids, page_tiers, n_pages, scale: float, out, *,
                       page_mass=None, max_pages_used: int | None = None,
                       pages_per_split: int | None = None) -> Launch:
    """ada_decode's launches, prepared once (arguments as ada_decode); call the result to run a step."""
    return _prepare(module, xp, "ada_decode", q, tiers, fill, page_ids, page_tiers, n_pages, scale, out, page_mass,
                    max_pages_used, pages_per_split)


def dense_decode(module, xp, q, k, v, fill, page_ids, n_pages, scale: float, out, *, slot_mass=None,
                 page_mass=None, max_pages_used: int | None = None, pages_per_split: int | None = None,
                 mass_seed: int = 0) -> None:
    """One decode step of one layer over dense float16 pages (twin: attention.gather_dense + attend_dense).

    q (nq, D) float32; k, v (N, P, D) float16 pool fields; fill (N,) int32; page_ids (H, max_pages) int32;
    n_pages (H,) int32; out (nq, D) float32 <- the attention output. slot_mass (N, P) float16 or None: += each
    slot's attention mass (rounded stochastically with mass_seed); page_mass (H, max_pages) float32 or None <-
    each table entry's. max_pages_used: an
    upper bound on n_pages (default: the table width) that sizes the split-K grid; pages_per_split: table
    entries per block (default: about TARGET_BLOCKS blocks)."""
    _run(module, xp, "dense_decode", q, [dense_tier(xp, k, v, slot_mass, mass_seed)], fill, page_ids, None, n_pages,
         scale, out, page_mass, max_pages_used, pages_per_split)


def ada_decode(module, xp, q, tiers: list[Tier], fill, page_ids, page_tiers, n_pages, scale: float, out, *,
               page_mass=None, max_pages_used: int | None = None, pages_per_split: int | None = None) -> None:
    """One decode step of one layer over pages of any tiers, dense float16 or ADA (logits from the codes):
    twin of PagedKVCache._scores + softmax_attend, GPU twin of ckernels.paged_decode.

    tiers: one Tier per pool, in pool order (= page_tiers values); fill (N,) int32: the arena's;
    page_tiers (H, max_pages) int8; the rest as in dense_decode (slot mass: each tier's `mass` array)."""
    _run(module, xp, "ada_decode", q, tiers, fill, page_ids, page_tiers, n_pages, scale, out, page_mass,
         max_pages_used, pages_per_split)
