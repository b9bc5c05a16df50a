"""Convert a llama-architecture GGUF file into an ordinary Hugging Face model folder.

References:
- GGUF format and metadata keys: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, read with the
  `gguf` Python package (`GGUFReader`, `gguf.quants.dequantize`).
- Tensor names: llama.cpp's `gguf-py/gguf/tensor_mapping.py` (blk.N.attn_q <-> model.layers.N.self_attn.q_proj).
- q/k row order: llama.cpp's `convert_hf_to_gguf.py` (LlamaModel.permute) turns HF's rotate-half rotary
  layout (pairs (i, i + D/2)) into interleaved pairs (2i, 2i + 1). We undo it:
      W_hf[h*D + p*(D/2) + i, :] = W_gguf[h*D + 2*i + p, :]      p in {0, 1}, i < D/2
- Tokenizer: llama.cpp's `llama-vocab.cpp` (byte-level BPE for `tokenizer.ggml.model = gpt2`, pre-tokenizer
  regexes per `tokenizer.ggml.pre`, control tokens split out before BPE, merges never ignored).

Output folder: config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, skvrt-convert.json (the tokenizer revision, so a folder converted
by an older skvrt gets its tokenizer.json rebuilt: `refresh_tokenizer`). Written into a temp folder next to
`out_dir` and renamed at the end, so an interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import InputError, ModelLoadError
from .safetensors_io import write_safetensors

__all__ = ["convert_gguf", "open_gguf", "build_tokenizer", "build_tokenizer_json", "refresh_tokenizer",
           "tokenizer_is_current", "gguf_to_hf_name",
           "unpermute_qk", "permute_qk", "SUPPORTED_PRE_TYPES"]

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# What `build_tokenizer` makes; a converted folder records it in skvrt-convert.json. 1: before bytes missing from
# the vocabulary cut pre-tokenizer pieces (their neighbours could merge, unlike llama.cpp).
TOKENIZER_REVISION = 2
CONVERT_STAMP = "skvrt-convert.json"

# Pre-tokenizer types whose llama.cpp regex list is [\p{N}, GPT-2 regex] (individual digits first).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell"}
# Pre-tokenizer types handled as the plain GPT-2 regex. ("default" is what old GGUFs without
# tokenizer.ggml.pre carry; their HF tokenizers are GPT-2 style. llama.cpp itself falls back to a
# heuristic regex for it and warns that quality is degraded.)
_PLAIN_GPT2 = {"gpt-2", "gpt2", "default"}
SUPPORTED_PRE_TYPES = frozenset(_DIGITS_THEN_GPT2 | _PLAIN_GPT2)

# Tokens llama.cpp treats as end-of-generation by their text (llama-vocab.cpp), besides the EOS id.
_EOG_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>",
              "<EOT>", "<|eom_id|>")

_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")

ProgressFn = Callable[[int, int, str], None]


# ----------------------------------------------------------------------------------------------- reading
def open_gguf(path: str | os.PathLike):
    """Open `path` with `gguf.GGUFReader`, turning every way it can be bad into one `ModelLoadError`."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/IndexError/... on truncated or corrupt files
        raise ModelLoadError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise ModelLoadError(f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes up to "
                                 f"{t.data_offset + int(t.n_bytes)} but the file has {size}")
    return reader


def _get(reader, key: str, default=...):
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ModelLoadError(f"GGUF metadata lacks required key {key!r}")
        return default
    return field.contents()


def _get_int(reader, key: str, default=...) -> int:
    v = _get(reader, key, default)
    if v is default and default is not ...:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ModelLoadError(f"GGUF metadata {key!r} = {v!r}: expected one integer (per-layer values are "
                             "not supported)")
    return int(v)


def _short_float(x: float) -> float:
    """The shortest decimal that rounds to the same float32 as `x` (9.999999747e-06 -> 1e-05)."""
    f32 = np.float32(x)
    for p in range(1, 10):
        y = float(f"{float(f32):.{p}g}")
        if np.float32(y) == f32:
            return y
    return float(f32)


# ------------------------------------------------------------------------------------------ tensor names
def gguf_to_hf_name(name: str) -> str:
    """GGUF tensor name -> HF llama name; `ModelLoadError` for a tensor this converter does not know."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _BLK_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{int(m.group(1))}.{_LAYER_MAP[m.group(2)]}.weight"
    raise ModelLoadError(f"unsupported tensor {name!r} in GGUF file (not part of a plain llama model)")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF interleaved-rotary q/k rows -> HF rotate-half rows.

    w: (n_head*D, in) -> (n_head*D, in) with W_hf[h*D + p*(D/2) + i] = W_gguf[h*D + 2*i + p].
    """
    rows = w.shape[0]
    d = rows // n_head
    if d * n_head != rows or d % 2:
        raise ModelLoadError(f"cannot split {rows} q/k rows into {n_head} heads of even size")
    return np.ascontiguousarray(w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> GGUF interleaved rows (llama.cpp's converter permute; inverse of the above)."""
    d = w.shape[0] // n_head
    return np.ascontiguousarray(w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# ------------------------------------------------------------------------------------------- tokenizer
def _str_list(reader, key: str) -> list[str]:
    v = _get(reader, key)
    if not isinstance(v, list):
        raise ModelLoadError(f"GGUF metadata {key!r} is not an array")
    return v


def build_tokenizer(reader):
    """Rebuild the byte-level BPE tokenizer of a `tokenizer.ggml.model = gpt2` GGUF as a `tokenizers.Tokenizer`.

    - model: BPE over the GGUF vocab and merges (rank = position in the merges list), no unk token, no
      byte fallback, `ignore_merges=False` (llama.cpp only skips merges for its llama3-family pre types);
    - pre-tokenizer: for "smollm" (and the other types llama.cpp gives the same regex list)
      `Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)])`;
      for "gpt-2"/"default" plain `ByteLevel(add_prefix_space=False, use_regex=True)`; then, if some bytes have
      no token, a `Split` that cuts pieces at those bytes and removes them (llama.cpp never merges across them);
    - decoder ByteLevel; post-processor ByteLevel(trim_offsets=False), or a BOS template if the GGUF says
      `add_bos_token`;
    - CONTROL tokens become special added tokens, USER_DEFINED tokens plain added tokens, so both are
      split out of the text before BPE, as llama.cpp does.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok_model = _get(reader, "tokenizer.ggml.model", None)
    if tok_model != "gpt2":
        raise ModelLoadError(f"unsupported tokenizer model {tok_model!r}: only byte-level BPE ('gpt2') is "
                             "supported")
    pre = _get(reader, "tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRE_TYPES:
        raise ModelLoadError(f"unsupported pre-tokenizer type {pre!r} (supported: "
                             f"{', '.join(sorted(SUPPORTED_PRE_TYPES))})")
    tokens = _str_list(reader, "tokenizer.ggml.tokens")
    types = _get(reader, "tokenizer.ggml.token_type", None)
    if types is None:
        types = [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelLoadError(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types")
    merges_raw = _str_list(reader, "tokenizer.ggml.merges")

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
        raise ModelLoadError(f"GGUF vocabulary has {len(tokens) - len(vocab)} duplicate token strings")

    merges: list[tuple[str, str]] = []
    for rank, m in enumerate(merges_raw):
        k = m.find(" ", 1)  # llama.cpp splits at the first space after position 0
        if k < 0:
            raise ModelLoadError(f"GGUF merge #{rank} {m!r} is not of the form 'left right'")
        a, b = m[:k], m[k + 1:]
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise ModelLoadError(f"GGUF merge #{rank} {m!r} uses or makes a token missing from the vocabulary")
        merges.append((a, b))

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False,
                              ignore_merges=False))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if pre in _DIGITS_THEN_GPT2 else []
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    # A byte whose byte-level character is not a token stays a symbol in llama.cpp's merge loop -- nothing
    # merges across it -- and is dropped at the end. `tokenizers` drops it before merging, so its neighbours
    # could merge ('"\x16{' -> '"{'). Cutting the piece at such bytes (and removing them) is llama.cpp's
    # result: no merge can involve a character that is not in the vocabulary.
    missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    if missing:
        steps.append(pre_tokenizers.Split(Regex("[" + "".join(re.escape(c) for c in sorted(missing)) + "]"),
                                          behavior="removed"))
    tk.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()

    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == TOKEN_CONTROL:
            added.append(AddedToken(t, special=True, normalized=False, single_word=False, lstrip=False,
                                    rstrip=False))
        elif ty == TOKEN_USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False, single_word=False, lstrip=False,
                                    rstrip=False))
    if added:
        tk.add_tokens(added)  # keeps the ids: every content is already in the vocabulary
        for a in added:
            if tk.token_to_id(a.content) != vocab[a.content]:
                raise ModelLoadError(f"added token {a.content!r} did not keep its id {vocab[a.content]}")

    bos_id = _get_int(reader, "tokenizer.ggml.bos_token_id", None)
    if _get(reader, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tk.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False, add_prefix_space=False),
            processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, bos_id)]),
        ])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False, add_prefix_space=False)
    return tk


def build_tokenizer_json(reader) -> str:
    """The rebuilt tokenizer (see `build_tokenizer`) serialised as tokenizer.json text."""
    return build_tokenizer(reader).to_str(pretty=True)


def _tokenizer_files(reader, context_length: int) -> dict[str, object]:
    """tokenizer_config.json, special_tokens_map.json and generation_config.json contents."""
    tokens = _str_list(reader, "tokenizer.ggml.tokens")
    types = _get(reader, "tokenizer.ggml.token_type", None) or [TOKEN_NORMAL] * len(tokens)

    def tok(key):
        i = _get_int(reader, key, None)
        if i is None:
            return None, None
        if not 0 <= i < len(tokens):
            raise ModelLoadError(f"GGUF metadata {key!r} = {i} is outside the vocabulary (0..{len(tokens) - 1})")
        return i, tokens[i]

    bos_id, bos = tok("tokenizer.ggml.bos_token_id")
    eos_id, eos = tok("tokenizer.ggml.eos_token_id")
    unk_id, unk = tok("tokenizer.ggml.unknown_token_id")
    pad_id, pad = tok("tokenizer.ggml.padding_token_id")
    named = {bos, eos, unk, pad} - {None}
    control = [t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]

    tc: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_get(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_get(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    stm: dict[str, object] = {}
    for key, val in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)):
        if val is not None:
            tc[key] = val
            stm[key] = val
    extra = [t for t in control if t not in named]
    if extra:
        stm["additional_special_tokens"] = extra
    template = _get(reader, "tokenizer.chat_template", None)
    if template:
        tc["chat_template"] = template

    # EOS ids for generation: the GGUF eos first, then other control tokens llama.cpp also stops on.
    eos_ids = [] if eos_id is None else [eos_id]
    for t, ty in zip(tokens, types):
        if ty == TOKEN_CONTROL and t in _EOG_TEXTS:
            i = tokens.index(t)
            if i not in eos_ids:
                eos_ids.append(i)
    gen: dict[str, object] = {"_from_model_config": False}
    if bos_id is not None:
        gen["bos_token_id"] = bos_id
    if eos_ids:
        gen["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    if pad_id is not None:
        gen["pad_token_id"] = pad_id
    return {"tokenizer_config": tc, "special_tokens_map": stm, "generation_config": gen,
            "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id}


# ----------------------------------------------------------------------------------------------- config
def _llama_config(reader, n_vocab_tokens: int, has_output: bool, dtype: str) -> tuple[dict, dict]:
    """config.json contents (and the tokenizer-side files, which share the special-token ids)."""
    arch = _get(reader, "general.architecture", None)
    if arch != "llama":
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}: only 'llama' is supported")
    a = "llama."
    hidden = _get_int(reader, a + "embedding_length")
    n_head = _get_int(reader, a + "attention.head_count")
    n_kv = _get_int(reader, a + "attention.head_count_kv", n_head)
    head_dim = _get_int(reader, a + "attention.key_length", hidden // n_head)
    if _get_int(reader, a + "attention.value_length", head_dim) != head_dim:
        raise ModelLoadError("GGUF has different key and value head sizes: not supported")
    rot = _get_int(reader, a + "rope.dimension_count", head_dim)
    if rot != head_dim:
        raise ModelLoadError(f"partial rotary embedding ({rot} of {head_dim} dims) is not supported")
    scaling = _get(reader, a + "rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ModelLoadError(f"rope scaling {scaling!r} is not supported")
    if n_head % n_kv:
        raise ModelLoadError(f"{n_head} query heads are not a multiple of {n_kv} KV heads")
    eps = _get(reader, a + "attention.layer_norm_rms_epsilon")
    theta = _get(reader, a + "rope.freq_base", 10000.0)  # GGUF spec default when absent
    ctx = _get_int(reader, a + "context_length")
    vocab_size = _get_int(reader, a + "vocab_size", n_vocab_tokens)
    tf = _tokenizer_files(reader, ctx)
    cfg: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _get_int(reader, a + "feed_forward_length"),
        "num_hidden_layers": _get_int(reader, a + "block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _short_float(eps),
        "rope_theta": _short_float(theta),
        "max_position_embeddings": ctx,
        "vocab_size": vocab_size,
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }
    if tf["bos_id"] is not None:
        cfg["bos_token_id"] = tf["bos_id"]
    if tf["eos_id"] is not None:
        cfg["eos_token_id"] = tf["eos_id"]
    if tf["pad_id"] is not None:
        cfg["pad_token_id"] = tf["pad_id"]
    return cfg, tf


# ---------------------------------------------------------------------------------------------- convert
def _check_tensor_types(reader, path: Path) -> None:
    """Fail before any work if a tensor's type cannot be dequantized by the installed `gguf` package."""
    import gguf

    q = gguf.GGMLQuantizationType
    traits = getattr(gguf.quants, "_type_traits", None)  # types with a NumPy dequantizer
    if traits is None:  # unknown gguf version: dequantize() will say so per tensor
        return
    supported = {q.F32, q.F16} | set(traits)
    for t in reader.tensors:
        if t.tensor_type not in supported:
            raise ModelLoadError(f"{path}: tensor {t.name!r} has unsupported quantization type "
                                 f"{t.tensor_type.name}")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
                 progress: ProgressFn | None = None, overwrite: bool = False) -> Path:
    """Convert a llama GGUF to a Hugging Face folder at `out_dir`; returns `out_dir` as a Path.

    dtype: "float32", "float16" or "bfloat16" for model.safetensors. progress(done, total, hf_name) is
    called after each tensor. An existing non-empty `out_dir` is an `InputError` unless `overwrite`.
    Bad input (not a GGUF, truncated, non-llama architecture, tokenizer other than gpt2, unsupported
    pre-tokenizer or quantization type) raises `ModelLoadError`.
    """
    import gguf

    if dtype not in ("float32", "float16", "bfloat16"):
        raise InputError(f"unsupported dtype {dtype!r}: use float32, float16 or bfloat16")
    src = Path(gguf_path)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"{out} already exists and is not empty")

    reader = open_gguf(src)
    names = [t.name for t in reader.tensors]
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ModelLoadError(f"{src}: GGUF has no tokenizer (tokenizer.ggml.tokens missing)")
    tokens = _str_list(reader, "tokenizer.ggml.tokens")
    cfg, tf = _llama_config(reader, len(tokens), "output.weight" in names, dtype)  # checks the architecture
    hf_names = [gguf_to_hf_name(n) for n in names]  # fails early on unknown tensors
    tokenizer = build_tokenizer(reader)
    _check_tensor_types(reader, src)

    n_layers = cfg["num_hidden_layers"]
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{v}.weight" for i in range(n_layers) for v in _LAYER_MAP.values()}
    missing = sorted(expected - set(hf_names))
    if missing:
        raise ModelLoadError(f"{src}: GGUF lacks tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    extra_layers = [n for n in hf_names if n.startswith("model.layers.") and int(n.split(".")[2]) >= n_layers]
    if extra_layers:
        raise ModelLoadError(f"{src}: tensor {extra_layers[0]!r} is beyond block_count {n_layers}")

    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors: dict[str, np.ndarray] = {}
    total = len(reader.tensors)
    for done, (t, hf) in enumerate(zip(reader.tensors, hf_names), 1):
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost-first
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ModelLoadError(f"{src}: cannot dequantize tensor {t.name!r} ({t.tensor_type.name}): {e}") \
                from None
        w = np.asarray(w, dtype=np.float32).reshape(shape)  # (out_features, in_features) or (n,)
        if hf.endswith("q_proj.weight"):
            w = unpermute_qk(w, n_head)
        elif hf.endswith("k_proj.weight"):
            w = unpermute_qk(w, n_kv)
        if dtype == "float16":
            w = w.astype(np.float16)
        tensors[hf] = w
        if progress is not None:
            progress(done, total, hf)

    emb = tensors["model.embed_tokens.weight"]
    if emb.shape != (cfg["vocab_size"], cfg["hidden_size"]):
        raise ModelLoadError(f"{src}: token_embd has shape {emb.shape}, expected "
                             f"({cfg['vocab_size']}, {cfg['hidden_size']})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        write_safetensors(tmp / "model.safetensors", tensors, dtype=dtype)
        del tensors
        _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "generation_config.json", tf["generation_config"])
        _write_json(tmp / "tokenizer_config.json", tf["tokenizer_config"])
        _write_json(tmp / "special_tokens_map.json", tf["special_tokens_map"])
        tokenizer.save(str(tmp / "tokenizer.json"), pretty=True)
        _write_json(tmp / CONVERT_STAMP, {"tokenizer_revision": TOKENIZER_REVISION})
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700 folders
        if out.exists():
            trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, trash / "old")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(trash / "old", out)  # put the previous folder back
                raise
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def tokenizer_is_current(folder: str | os.PathLike) -> bool:
    """Whether a converted folder's tokenizer.json is what this skvrt's `build_tokenizer` makes (its
    skvrt-convert.json records TOKENIZER_REVISION or later)."""
    try:
        stamp = json.loads((Path(folder) / CONVERT_STAMP).read_text(encoding="utf-8"))
        return int(stamp.get("tokenizer_revision", 0)) >= TOKENIZER_REVISION
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def refresh_tokenizer(gguf_path: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Rebuild `folder`/tokenizer.json from the GGUF it was converted from (for a folder an older skvrt wrote:
    `tokenizer_is_current`), then stamp the folder. The weights are not touched; the new file replaces the old
    in one rename."""
    folder = Path(folder)
    tokenizer = build_tokenizer(open_gguf(gguf_path))
    tmp = folder / ".tokenizer.json.tmp"
    try:
        tokenizer.save(str(tmp), pretty=True)
        os.replace(tmp, folder / "tokenizer.json")
    finally:
        tmp.unlink(missing_ok=True)
    _write_json(folder / CONVERT_STAMP, {"tokenizer_revision": TOKENIZER_REVISION})


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
