"""Load an HF model folder: config.json, *.safetensors (one file or sharded with an index),
tokenizer.json / tokenizer_config.json, generation_config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .errors import ConfigError, ModelLoadError
from .models import get_architecture
from .safetensors_io import read_safetensors, read_safetensors_header
from .tokenizer import Tokenizer

SIDECAR = "skvrt-kv.safetensors"  # skvrt.calibrate's sidecar, next to the weights


@dataclasses.dataclass
class LoadedModel:
    path: Path
    config: dict
    model: object  # skvrt.models.<arch>.Model
    tokenizer: Tokenizer
    generation_config: dict


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found: {what} is required") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def load_config(folder: Path) -> dict:
    return read_json(folder / "config.json", "config.json")


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "the safetensors index").get("weight_map", {})
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(f for f in folder.glob("*.safetensors") if f.name != SIDECAR)  # the sidecar is not weights
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {folder}")
    return files


def load_weights(folder: Path) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for f in weight_files(folder):
        weights.update(read_safetensors(f))
    return weights


def load_args(config: dict):
    arch = get_architecture(config.get("model_type"))
    return arch, arch.ModelArgs.from_config(config)


def load_folder(folder: str | Path) -> LoadedModel:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    config = load_config(folder)
    arch, args = load_args(config)
    gen_path = folder / "generation_config.json"
    gen = read_json(gen_path, "generation config") if gen_path.is_file() else {}
    tokenizer = Tokenizer(folder, gen)
    if tokenizer.vocab_size > args.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but config vocab_size is {args.vocab_size}")
    from .calibrate import load_calibration

    args.kv_calibration = load_calibration(folder)
    model = arch.Model(args, load_weights(folder))
    return LoadedModel(folder, config, model, tokenizer, gen)


def safetensors_shapes(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape) from a safetensors header, without reading the data."""
    header, _ = read_safetensors_header(path)
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


def describe(folder: str | Path) -> dict:
    """What `skvrt info` prints: architecture, sizes, parameters, KV bytes per token."""
    folder = Path(folder)
    config = load_config(folder)
    _, a = load_args(config)
    shapes: dict = {}
    for f in weight_files(folder):
        shapes.update(safetensors_shapes(f))
    n_params = sum(int(np.prod(s)) for _, s in shapes.values())
    dtypes = sorted({d for d, _ in shapes.values()})
    kv_fp16 = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * 2
    return {
        "path": str(folder),
        "architecture": a.model_type,
        "layers": a.num_hidden_layers,
        "hidden_size": a.hidden_size,
        "intermediate_size": a.intermediate_size,
        "query_heads": a.num_attention_heads,
        "kv_heads": a.num_key_value_heads,
        "head_dim": a.head_dim,
        "vocab_size": a.vocab_size,
        "context_length": a.max_position_embeddings,
        "rope_theta": a.rope_theta,
        "rope_scaling": a.rope_scaling or "none",
        "tied_embeddings": a.tie_word_embeddings,
        "parameters": n_params,
        "weights_dtype": ",".join(dtypes),
        "kv_bytes_per_token_fp16": kv_fp16,
        "kv_bytes_full_context_fp16": kv_fp16 * a.max_position_embeddings,
    }
