"""Generation in three layers (after mlx-lm's generate.py):

    generate_step   -> yields (token id, logprobs) forever; the caller decides when to stop
    stream_generate -> yields GenerationResponse (text piece + stats), handles EOS / stop strings / length
    (skvrt.llm.LLM.generate joins the pieces into a string)

Prefill is chunked so an 8K prompt needs bounded memory: attention scores are (heads, chunk, context).
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .errors import ContextOverflowError, InputError
from .ops import log_softmax
from .tokenizer import StreamingDetokenizer, Tokenizer

PREFILL_CHUNK = 256


def prefill(model, cache, tokens: Sequence[int], chunk: int = PREFILL_CHUNK,
            progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Feed `tokens` after the cache's contents in chunks -> logits (V,) of the last token."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) == 0:
        raise InputError("nothing to prefill: the prompt is empty")
    chunk = min(chunk, getattr(cache, "max_chunk", chunk))  # budgeted caches take smaller chunks
    lookahead = getattr(cache, "wants_lookahead", False)
    passes = 2 if lookahead else 1

    def feed(p: int) -> np.ndarray:  # pass p of `passes`: the whole prompt in chunks -> the last chunk's logits
        for start in range(0, len(tokens), chunk):
            logits = model.forward(tokens[start : start + chunk], cache)
            if progress:
                progress((p * len(tokens) + min(start + chunk, len(tokens))) // passes, len(tokens))
        return logits

    if lookahead:  # a first pass that only records the prompt's last queries (Policy.lookahead)
        start_pos = cache.offset
        cache.begin_lookahead(start_pos + len(tokens))
        try:
            feed(0)
        except BaseException:  # Ctrl-C or an error: back to where the prompt began, nothing kept
            cache.end_lookahead(start_pos, keep=False)
            raise
        cache.end_lookahead(start_pos)  # back to where the prompt began, queries kept for the second pass
    return feed(passes - 1)[-1]


def generate_step(model, cache, prompt: Sequence[int], sampler: Callable, history: list[int] | None = None,
                  prefill_chunk: int = PREFILL_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """Prefill `prompt` (the tokens the cache lacks), then yield (token, logprobs (V,)) one decode step at a time.

    `history` (tokens already in context, for the repetition penalty) is extended in place.
    """
    history = history if history is not None else list(prompt)
    logits = prefill(model, cache, prompt, prefill_chunk)
    while True:
        logprobs = log_softmax(logits)
        token = sampler(logits, history)
        history.append(token)
        yield token, logprobs
        if cache.offset >= cache.n_ctx:
            return
        logits = model.forward(np.array([token], dtype=np.int64), cache)[-1]


@dataclasses.dataclass
class GenerationResponse:
    text: str  # new text since the previous response
    token: int | None  # token id of this step (None for the final flush)
    logprobs: np.ndarray | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_mb: float
    finish_reason: str | None = None  # "stop" | "length" | "context" | "interrupted" on the last response


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


def stream_generate(model, cache, tokenizer: Tokenizer, prompt: Sequence[int], sampler: Callable,
                    max_tokens: int = 256, stop: Sequence[str] = (), history: list[int] | None = None,
                    prefill_chunk: int = PREFILL_CHUNK) -> Iterator[GenerationResponse]:
    """Yield text pieces as they complete; the last response carries finish_reason.

    Stops at any of the tokenizer's EOS ids (not emitted), at a user stop string (text up to it is emitted),
    after max_tokens, or when the context is full.
    """
    if max_tokens < 0:
        raise InputError("max_tokens must be >= 0")
    detok = StreamingDetokenizer(tokenizer)
    stops = [s for s in stop if s]
    pending = ""
    t0 = time.perf_counter()
    prompt_tps = gen_tps = 0.0
    n = 0
    finish = "length"
    t_gen = t0

    def resp(text, token=None, logprobs=None, finish_reason=None):
        return GenerationResponse(text, token, logprobs, len(prompt), prompt_tps, n, gen_tps, peak_rss_mb(),
                                  finish_reason)

    if max_tokens == 0:
        prefill(model, cache, prompt, prefill_chunk)
        prompt_tps = len(prompt) / (time.perf_counter() - t0)
        yield resp("", finish_reason="length")
        return
    steps = generate_step(model, cache, prompt, sampler, history, prefill_chunk)
    by_stop_string = False
    try:
        for token, logprobs in steps:
            if n == 0:
                t_gen = time.perf_counter()
                prompt_tps = len(prompt) / (t_gen - t0)
            n += 1
            gen_tps = (n - 1) / (time.perf_counter() - t_gen) if n > 1 else 0.0
            if token in tokenizer.eos_ids:
                finish = "stop"
                break
            pending += detok.add(token)
            hit = min((pending.find(s) for s in stops if s in pending), default=-1)
            if hit >= 0:
                yield resp(pending[:hit], token, logprobs)
                pending, finish, by_stop_string = "", "stop", True
                break
            hold = _stop_holdback(pending, stops) if stops else 0
            out, pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
            yield resp(out, token, logprobs)
            if n >= max_tokens:
                break
        else:
            finish = "context"
    except KeyboardInterrupt:
        finish = "interrupted"
        cache.truncate(cache.offset)  # drop keys/values a half-finished step wrote
    finally:
        steps.close()
    tail = "" if by_stop_string else pending + detok.finish()
    yield resp(tail, finish_reason=finish)


def check_fits(n_prompt: int, n_ctx: int) -> None:
    if n_prompt == 0:
        raise InputError("the prompt is empty")
    if n_prompt >= n_ctx:
        raise ContextOverflowError(
            f"the prompt has {n_prompt} tokens but the context holds {n_ctx} (one more is needed to generate); "
            f"shorten the prompt or raise --ctx-size"
        )
