"""CUDA graphs for the decode step: one token through every layer replayed from a captured graph, so Python
launch overhead (~15 launches per layer) does not set the decode speed.

    step = DecodeStep(model, cache, use_graph=True)   # model on CudaOps, cache a DeviceKVCache
    logits = step(token)                              # (V,) float32 on the host, cache advanced by one

A step is split in three (skvrt/cuda/cache.py, static decode steps):
  1. host: `cache.begin_static_step()` plans the step's pages for every layer (allocation, positions, fill),
     uploads the plan, the position and the page tables into persistent device buffers, and names the
     split-K bucket; the token id goes into a persistent device buffer;
  2. device: the forward pass (embedding .. logits), every launch reading only persistent buffers -- captured
     once per bucket (first a warm-up run, which is the real step, then the capture) and replayed after;
  3. host + device: `cache.end_static_step()` advances (fifo window moves run eagerly, outside the graph).

Conditions for replay (the graph bakes in every kernel argument, pointer and grid):
  * xp is cupy (under numpy the same three parts run eagerly: what CI exercises);
  * one token per step on a DeviceKVCache whose arena, tables and fill arrays are never reallocated (they are
    not: they are preallocated for n_ctx) and whose decode grid bucket (a power of two of the longest page list)
    is the one captured -- a new bucket is captured on first use (at most log2(max pages) graphs);
  * weights and the model are not changed after capture;
  * nothing in part 2 touches the host: no H2D copies of pageable memory, no .get(), no allocation outside the
    graph's private memory pool (part 2 allocates from a pool owned by the graph, reused only by its replays);
  * all work of a step runs on one stream (self.stream, non-blocking), synchronised at the end of the step,
    so eager work issued afterwards on another stream cannot overlap a replay.
"""

from __future__ import annotations

import numpy as np


class DecodeStep:
    def __init__(self, model, cache, use_graph: bool = True):
        self.model, self.cache = model, cache
        self.ops = model.ops
        self.xp = self.ops.xp
        self.use_graph = use_graph and self.xp is not np
        cache.enable_static()
        self.tok = self.xp.zeros(1, np.int64)
        self.graphs = {}  # bucket -> (graph, logits array of the graph, private memory pool)
        self.stream = None
        self.captures = 0
        self.capture_error = None  # why capture failed (then steps run eagerly), or None
        self._pools = []  # the private memory pools of the captures
        if self.use_graph:
            import cupy

            cupy.cuda.Device().synchronize()  # eager work on other streams done before the first step
            self.stream = cupy.cuda.Stream(non_blocking=True)

    def _device_forward(self):
        self.ops.static_pos = self.cache._static["pos"]
        try:
            return self.model.forward_device(self.tok, self.cache)
        finally:
            self.ops.static_pos = None

    def __call__(self, token: int) -> np.ndarray:
        if not self.use_graph:
            bucket = self.cache.begin_static_step()
            try:
                self.tok[...] = token
                out = self._device_forward()
            finally:
                self.cache.end_static_step()
            return self.ops.to_host(out)[-1]
        import cupy

        cupy.cuda.get_current_stream().synchronize()  # eager work issued before this step is done
        with self.stream:
            bucket = self.cache.begin_static_step()
            try:
                self.tok[...] = self.xp.asarray(np.array([token], np.int64))
                if bucket in self.graphs:
                    graph, out, _ = self.graphs[bucket]
                    graph.launch(self.stream)
                else:
                    out = self._capture(bucket)
                logits = out[-1].get()
            finally:
                self.cache.end_static_step()
            self.stream.synchronize()
        return logits

    def _capture(self, bucket: int):
        """Warm-up run (the real step: modules loaded, cuBLAS set up, the private pool filled), then capture the
        same launches into a graph kept for `bucket`. -> the warm-up's logits."""
        import cupy

        pool = cupy.cuda.MemoryPool()
        self._pools.append(pool)  # arrays made in it (e.g. the cache's decode buffers) outlive a failed capture
        with cupy.cuda.using_allocator(pool.malloc):
            out = self._device_forward()
            self.stream.synchronize()
            graph = None
            try:
                self.stream.begin_capture()
                try:
                    gout = self._device_forward()
                finally:
                    graph = self.stream.end_capture()
            except Exception as e:  # the step (the warm-up) is done; later steps run eagerly, said once
                import sys

                print(f"skvrt: CUDA graph capture failed, decode steps run eagerly from now on "
                      f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})",
                      file=sys.stderr)
                self.use_graph = False
                self.capture_error = e
                return out
        self.graphs[bucket] = (graph, gout, pool)
        self.captures += 1
        return out


class GraphedModel:
    """A model whose one-token forward calls go through DecodeStep (CUDA graphs); everything else is the model's.
    What skvrt.llm.LLM uses on CUDA when cuda_graphs is on; generate.py only calls forward."""

    def __init__(self, model, cache, use_graph: bool = True):
        self.model, self.cache = model, cache
        self.args, self.ops = model.args, model.ops
        self.step = DecodeStep(model, cache, use_graph)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, tokens, cache, all_logits: bool = False) -> np.ndarray:
        if len(tokens) == 1 and cache is self.cache:
            return self.step(int(tokens[0]))[None, :]
        return self.model.forward(tokens, cache, all_logits)
