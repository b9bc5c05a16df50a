"""The `skvrt` console script end to end (subprocesses, as a user runs it): stdout carries only the
generated text, errors are one line on stderr with exit code 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def cli(*args, stdin: bytes | None = None, timeout=300):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "skvrt.cli.main", *args], input=stdin, capture_output=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def model(converted_default):
    return str(converted_default)


def test_run_greedy_prints_only_the_reply(model):
    import skvrt

    expected = skvrt.load(model).chat([{"role": "user", "content": "What is the capital of France?"}],
                                      max_tokens=20, temp=0)
    r = cli("run", "-m", model, "-p", "What is the capital of France?", "--temp", "0", "-n", "20")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == expected + "\n"
    assert "Paris" in expected


def test_run_reads_stdin_and_raw(model):
    import skvrt

    prompt = "The three primary colours are"
    expected = skvrt.load(model).generate(prompt, max_tokens=12, temp=0)
    r = cli("run", "-m", model, "-p", "-", "--raw", "--temp", "0", "-n", "12", "-v", stdin=prompt.encode())
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == expected + "\n"
    assert b"tok/s" in r.stderr  # -v stats go to stderr, never stdout


def test_seed_reproducible(model):
    a = cli("run", "-m", model, "-p", "Tell me a joke.", "--seed", "3", "-n", "16", "--temp", "1.0")
    b = cli("run", "-m", model, "-p", "Tell me a joke.", "--seed", "3", "-n", "16", "--temp", "1.0")
    assert a.returncode == 0 and a.stdout == b.stdout


@pytest.mark.parametrize(
    "args,stdin,phrase",
    [
        (["run", "-p", "-"], b"caf\xe9 au lait", "not valid UTF-8"),
        (["run", "-p", ""], None, "prompt is empty"),
        (["run", "-p", "hi", "--ctx-size", "8"], None, "context holds 8"),
        (["run", "-p", "hi", "--top-p", "0"], None, "out of range"),
        (["run", "-p", "hi", "--kv-dtype", "int3"], None, "--kv-dtype"),
    ],
)
def test_bad_input_one_clear_error(model, args, stdin, phrase):
    r = cli(*args, "-m", model, stdin=stdin)
    assert r.returncode == 1
    assert r.stdout == b""
    err = r.stderr.decode().strip().splitlines()
    assert err[-1].startswith("error: ") and phrase in err[-1], err
    assert "Traceback" not in r.stderr.decode()


def test_missing_model_folder_error(tmp_path):
    r = cli("run", "-m", str(tmp_path / "nope"), "-p", "hi")
    assert r.returncode == 1 and b"error:" in r.stderr and b"Traceback" not in r.stderr


def test_info_json(model):
    r = cli("info", model, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    cfg = json.loads(open(os.path.join(model, "config.json")).read())
    assert d["layers"] == cfg["num_hidden_layers"] and d["kv_heads"] == cfg["num_key_value_heads"]
    assert d["kv_bytes_per_token_fp16"] == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
    assert d["parameters"] == 134_515_008  # REFERENCE.md: the GGUF's parameter count


def test_help_shows_defaults():
    r = cli("run", "--help")
    assert r.returncode == 0
    out = r.stdout.decode()
    for opt in ("--prompt", "--max-tokens", "--temp", "--top-p", "--top-k", "--min-p", "--seed", "--system-prompt",
                "--model", "--raw"):
        assert opt in out
    assert "default: 256" in out and "default: 0.8" in out


def test_convert_refuses_non_empty_out_dir(default_gguf, tmp_path):
    (tmp_path / "x").write_text("keep me")
    r = cli("convert", str(default_gguf), str(tmp_path))
    assert r.returncode == 1 and b"--force" in r.stderr
    assert (tmp_path / "x").read_text() == "keep me"


def test_chat_repl_turns_and_commands(model):
    """Scripted REPL session over a pipe: two turns, /stats, /regen, /clear, /exit."""
    import skvrt

    llm = skvrt.load(model)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    first = llm.chat(msgs, max_tokens=24, temp=0)
    script = "What is the capital of France?\n/stats\n/regen\n/clear\n/bogus\n/exit\n"
    r = cli("chat", "-m", model, "--temp", "0", "-n", "24", stdin=script.encode())
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.count(first) == 2  # the reply, then the same reply regenerated
    err = r.stderr.decode()
    assert "tok/s" in err and "conversation cleared" in err and "unknown command" in err
