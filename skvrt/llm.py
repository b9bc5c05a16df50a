"""The Python API for apps:

    import skvrt
    llm = skvrt.load()                       # default model, pulled on first use
    print(llm.generate("Once upon a time", max_tokens=32, temp=0))
    for piece in llm.stream("Hello", max_tokens=16): print(piece.text, end="")
    print(llm.chat([{"role": "user", "content": "What is the capital of France?"}], temp=0))

An LLM owns one sequence's KV cache and remembers which tokens it holds, so a follow-up prompt that shares a
prefix with the previous one (a chat turn) only prefills the new tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .backend import select as select_device
from .errors import InputError
from .generate import GenerationResponse, check_fits, stream_generate
from .kv import make_cache
from .loader import LoadedModel, load_folder
from .sample import SamplerSettings, make_sampler
from .threads import set_threads


class LLM:
    def __init__(self, loaded: LoadedModel, n_ctx: int | None = None, kv_dtype: str = "float16",
                 threads: int | None = None, kv_policy: str = "full", kv_opts: dict | None = None,
                 kv_budget=None, device: str | None = None, cuda_graphs: bool | None = None):
        self.device = select_device(device, for_model=True)  # DeviceError for an unusable --device cuda
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.args = loaded.model.args
        self.threads = set_threads(threads)
        n_ctx = n_ctx or self.args.max_position_embeddings
        self.kv_policy = kv_policy
        opts = dict(kv_opts or {})
        if kv_budget is not None:
            opts["budget"] = kv_budget
        self.cache = make_cache(self.args, n_ctx, kv_policy, kv_dtype, **opts)
        if self.device.name == "cuda" and self.device.requested == "auto":
            from .backend import Device
            from .cuda.cache import check_policy

            try:  # auto chooses: a policy the GPU does not run keeps the model on the CPU, saying why
                check_policy(self.cache)
            except InputError as e:
                self.device = Device("cpu", "auto", f"the GPU cannot run this KV policy: {e}")
        if self.device.name == "cuda":
            self._to_cuda(cuda_graphs)
        self.cached_tokens: list[int] = []  # token ids whose K/V the cache holds, in order
        self.last_stats: GenerationResponse | None = None

    def _to_cuda(self, cuda_graphs: bool | None) -> None:
        """Weights to the GPU (float16), the KV pages to a DeviceKVCache (InputError for a policy the GPU does
        not run); cuda_graphs (default $SKVRT_CUDA_GRAPHS=1): decode steps replayed from CUDA graphs
        (skvrt/cuda/graph.py)."""
        import os

        from .cuda.cache import DeviceKVCache
        from .cuda.model_ops import CudaOps

        module, xp = self.device.module_factory(), self.device.xp
        self.cache = DeviceKVCache(self.cache, module, xp)
        self.model = self.model.on(CudaOps(module, xp))
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("SKVRT_CUDA_GRAPHS", "0") == "1"
        if cuda_graphs:
            from .cuda.graph import GraphedModel

            self.model = GraphedModel(self.model, self.cache)

    @property
    def n_ctx(self) -> int:
        return self.cache.n_ctx

    # ---- prompts -------------------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_bos=False)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("the prompt is empty")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    # ---- generation ----------------------------------------------------------------------------------

    def _reuse_prefix(self, ids: list[int]) -> list[int]:
        """Keep the longest cached prefix of `ids` (at most len-1, to get logits) -> the tokens to prefill."""
        n = 0
        limit = min(len(ids) - 1, len(self.cached_tokens))
        while n < limit and self.cached_tokens[n] == ids[n]:
            n += 1
        self.cache.truncate(n)
        self.cached_tokens = self.cached_tokens[:n]
        return ids[n:]

    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256, stop: Sequence[str] = (),
               **sampling) -> Iterator[GenerationResponse]:
        """Raw prompt (text or ids, no chat template) -> text pieces; the last one has finish_reason."""
        ids = self.encode(prompt)
        check_fits(len(ids), self.n_ctx)
        new = self._reuse_prefix(ids)
        sampler = make_sampler(SamplerSettings(**sampling))
        history = list(ids)
        self.cached_tokens = list(ids[: len(ids) - len(new)])
        try:
            for r in stream_generate(self.model, self.cache, self.tokenizer, new, sampler, max_tokens, stop,
                                     history=history):
                self.last_stats = r
                yield r
        finally:
            # The cache holds every token fed so far: the prompt plus all sampled tokens but the last.
            self.cached_tokens = history[: self.cache.offset]

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, **kw) -> str:
        return "".join(r.text for r in self.stream(prompt, max_tokens, **kw))

    def chat_stream(self, messages: list[dict], max_tokens: int = 256, **kw) -> Iterator[GenerationResponse]:
        return self.stream(self.encode_chat(messages), max_tokens, **kw)

    def chat(self, messages: list[dict], max_tokens: int = 256, **kw) -> str:
        return "".join(r.text for r in self.chat_stream(messages, max_tokens, **kw))

    def reset(self) -> None:
        self.cache.reset()
        self.cached_tokens = []


def load(model: str | None = None, n_ctx: int | None = None, kv_dtype: str = "float16",
         threads: int | None = None, kv_policy: str = "full", kv_opts: dict | None = None,
         kv_budget=None, device: str | None = None, cuda_graphs: bool | None = None) -> LLM:
    """Load a model folder, a .gguf file, or a known model name (default: smollm2-135m-instruct).

    kv_policy: see skvrt.kv.KV_POLICIES (full, window, ada, quant, snapkv, h2o, spherical); kv_opts: that
    policy's options, e.g. {"window": 128} or {"k_bits": 2, "v_bits": 4}; kv_budget: the cache's byte budget
    -- "25%" (of the fp16 cache at n_ctx), 0.25, "64MiB" or bytes -- required by snapkv / h2o / spherical.
    device: "auto", "cpu" or "cuda" (default $SKVRT_DEVICE, else auto; skvrt.backend), checked before the
    model is read. On CUDA: weights float16 on the GPU, KV policies full / window / ada; cuda_graphs (default
    $SKVRT_CUDA_GRAPHS=1, else off) replays decode steps from CUDA graphs."""
    from .backend import select
    from .store import resolve

    select(device, for_model=True)  # fail before downloading / reading weights
    return LLM(load_folder(resolve(model)), n_ctx=n_ctx, kv_dtype=kv_dtype, threads=threads, kv_policy=kv_policy,
               kv_opts=kv_opts, kv_budget=kv_budget, device=device, cuda_graphs=cuda_graphs)
