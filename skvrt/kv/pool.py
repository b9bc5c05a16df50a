"""Preallocated page storage: one frame arena per sequence, tier pools laid out over its frames.

A `FrameArena` is one block of memory cut into n_frames frames of `frame_bytes` each, plus one int32 fill
count per frame, allocated once and never grown. Every tier pool (`TierPool`) lays its page out inside a frame
(`layout`): its arrays (`tier.fields`, plus `positions` and, when utilities are tracked, `mass`) are strided
views whose leading axis is the frame id, so page id == frame id and any frame can hold a page of any tier.
Tiers with smaller tokens fit more tokens into a frame (their page size P differs); a page still holds
tokens of exactly one (layer, kv head, tier). Freed frames go back to the arena for any tier to reuse, so a
byte budget is simply a number of frames: the cache can never hold more than its arena.
See `skvrt.kv.pages` for the page-table contract and docs/FORMAT.md for byte layouts.
"""

from __future__ import annotations

import numpy as np

from ..errors import ContextOverflowError
from .tiers import DenseTier, QuantTier  # noqa: F401  (re-exported)

from .layout import ALIGN, FILL_BYTES, layout, page_fields

class FrameArena:
    """n_frames frames of frame_bytes; one free list shared by every tier pool laid over it."""

    def __init__(self, n_frames: int, frame_bytes: int):
        if frame_bytes % ALIGN:
            raise ValueError(f"frame bytes must be a multiple of {ALIGN}")
        self.n_frames, self.frame_bytes = n_frames, frame_bytes
        self.buf = np.zeros(n_frames * frame_bytes, np.uint8)  # (N * F,) the only large allocation
        self.fill = np.zeros(n_frames, np.int32)  # (N,) valid slots of the page in each frame
        self.owner = np.full(n_frames, -1, np.int8)  # (N,) index of the pool whose page is there, -1 free
        self._free = list(range(n_frames - 1, -1, -1))  # stack; lowest ids first (deterministic runs)

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        """Every byte the arena holds: frames + fill counts."""
        return self.n_frames * (self.frame_bytes + FILL_BYTES)

    def alloc(self, owner: int, what: str) -> int:
        if not self._free:
            raise ContextOverflowError(
                f"KV cache full: all {self.n_frames} pages ({self.nbytes:,} bytes) are in use ({what})")
        f = self._free.pop()
        self.owner[f] = owner
        self.fill[f] = 0
        return f

    def free(self, f: int) -> None:
        if self.owner[f] < 0:
            raise RuntimeError(f"page {f} freed twice")
        self.owner[f] = -1
        self.fill[f] = 0
        self._free.append(f)


class TierPool:
    """The pages of one tier inside an arena: `data` (the tier's arrays + positions [+ mass]), each
    (N_frames, ...) with a page stride of arena.frame_bytes; `fill` is the arena's (shared) fill array.

    TierPool(tier, n_pages, page_size, head_dim) makes a pool with an arena of its own (tests, tools)."""

    def __init__(self, tier, n_pages: int = 0, page_size: int = 64, head_dim: int = 64, *,
                 arena: FrameArena | None = None, index: int = 0, track_mass: bool = False,
                 pos_dtype: str = "int32"):
        self.tier, self.page_size, self.head_dim = tier, page_size, head_dim
        self.track_mass = track_mass
        fields = page_fields(tier, page_size, head_dim, track_mass, pos_dtype)
        offsets, nbytes = layout(fields, page_size)
        if arena is None:
            arena = FrameArena(n_pages, nbytes)
        if nbytes > arena.frame_bytes:
            raise ValueError(f"a {tier.name} page of {page_size} tokens ({nbytes} B) does not fit a "
                             f"{arena.frame_bytes} B frame")
        self.arena, self.index = arena, index
        # what stats call the pool: its tier's name; "old-" + it for an old-token tier of the window's kind
        self.label = f"old-{tier.name}" if index > 0 and isinstance(tier, DenseTier) else tier.name
        self.n_pages = arena.n_frames  # page ids range over every frame
        self.stride = arena.frame_bytes  # bytes from page p to page p + 1 in every array of `data`
        self.data: dict[str, np.ndarray] = {}
        for name, dtype, shape in fields:
            dt = np.dtype(dtype)
            inner = np.cumprod((1,) + shape[::-1])[:-1][::-1] * dt.itemsize  # C strides inside the page
            self.data[name] = np.ndarray((arena.n_frames, *shape), dt, arena.buf, offsets[name],
                                         (arena.frame_bytes, *map(int, inner)))
        self.positions = self.data["positions"]  # (N, P) pos_dtype (int32; int16 in budgeted caches)
        if arena.n_free == arena.n_frames:  # a fresh arena: every slot unused (alloc resets reused frames)
            self.positions[:] = -1
        self.mass = self.data.get("mass")  # (N, P) float16 or None
        self.fill = arena.fill  # (N,) int32, shared by the arena's pools
        self.n_used = 0

    # dense-tier storage, as the C kernel reads it
    @property
    def k(self) -> np.ndarray:
        return self.data["k"]

    @property
    def v(self) -> np.ndarray:
        return self.data["v"]

    @property
    def page_bytes(self) -> int:
        """Bytes one page of this pool holds: its frame + the frame's fill count."""
        return self.stride + FILL_BYTES

    @property
    def n_free(self) -> int:
        return self.arena.n_free

    def in_use(self, pid: int) -> bool:
        return bool(self.arena.owner[pid] == self.index)

    def alloc(self) -> int:
        pid = self.arena.alloc(self.index, f"a page for tier {self.tier.name}")
        self.positions[pid] = -1
        if self.mass is not None:
            self.mass[pid] = 0
        self.n_used += 1
        return pid

    def free(self, pid: int) -> None:
        if self.arena.owner[pid] != self.index:
            raise RuntimeError(f"page {pid} freed by tier {self.tier.name!r}, which does not own it")
        self.arena.free(pid)
        self.positions[pid] = -1
        self.n_used -= 1

    def compact(self, pid: int, keep: np.ndarray) -> None:
        """Keep the slots of page `pid` where keep (fill,) is True, moved to the front in order."""
        n, f = int(keep.sum()), len(keep)
        for name in (*self.tier.per_slot, "positions", *(("mass",) if self.mass is not None else ())):
            arr = self.data[name]
            arr[pid, :n] = arr[pid, :f][keep]
        self.positions[pid, n:] = -1
        if self.mass is not None:
            self.mass[pid, n:] = 0
        self.fill[pid] = n

    def poison_unused(self) -> None:
        """Test hook: fill every float slot at or past `fill` of this pool's pages with NaN."""
        mine = self.arena.owner == self.index
        unused = (np.arange(self.page_size)[None, :] >= self.fill[:, None]) & mine[:, None]  # (N, P)
        for name in self.tier.per_slot:
            arr = self.data[name]
            if arr.dtype.kind == "f":
                arr[unused] = np.nan
