"""skvrt.evaluate and `skvrt eval` on a tiny random llama with a tiny byte-level BPE tokenizer (both built here,
no download, no torch): KL of the reference against itself, fp16 vs fp32 cache, step vs one-shot reference,
a brute-force KL / PPL, the reference store, the CLI's JSON, the passkey prompt builder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from skvrt import evaluate as ev
from skvrt.errors import InputError
from skvrt.kv import make_cache
from skvrt.loader import load_folder
from skvrt.ops import log_softmax
from skvrt.safetensors_io import write_safetensors

WORDS = ("the a river mill sky blue green grass sun yellow train station market bridge morning flour "
         "students read history of mathematics counting boards computers seven two before opens quiet "
         "runs past old where miller counts sacks every in library from to crosses arrives and").split()
HIDDEN, LAYERS, NQ, NKV, FFN = 32, 2, 4, 2, 48


def _corpus(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    out, line = [], []
    for w in rng.choice(WORDS, size=n_words):
        line.append(str(w))
        if len(line) >= 12 and rng.random() < 0.2:
            out.append(" ".join(line).capitalize() + ".")
            line = []
    out.append(" ".join(line) + ".")
    return " ".join(out)


def _tokenizer_json(folder, train_text: str) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([train_text], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, LoadedModel, eval text file). Random weights with a larger-than-default init so attention is
    not flat and fp16 rounding of K/V shows up in the logits."""
    folder = tmp_path_factory.mktemp("tiny_eval")
    train = _corpus(3000, 0) + " " + " ".join(ev.FILLER_SENTENCES) + " " + ev.PASSKEY_INTRO + " " + \
        ev.passkey_needle("12345") + " " + ev.PASSKEY_QUESTION
    n_vocab = _tokenizer_json(folder, train)
    V = n_vocab + 16
    cfg = dict(model_type="llama", hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
               num_attention_heads=NQ, num_key_value_heads=NKV, vocab_size=V, rope_theta=10000.0,
               rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    D = HIDDEN // NQ
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (V, HIDDEN)),
         "model.norm.weight": rng.uniform(0.5, 1.5, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = rng.uniform(0.5, 1.5, HIDDEN)
        w[p + "post_attention_layernorm.weight"] = rng.uniform(0.5, 1.5, HIDDEN)
        w[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.3, (NQ * D, HIDDEN))
        w[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.3, (NKV * D, HIDDEN))
        w[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.3, (NKV * D, HIDDEN))
        w[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.15, (HIDDEN, NQ * D))
        w[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.15, (FFN, HIDDEN))
        w[p + "mlp.up_proj.weight"] = rng.normal(0, 0.15, (FFN, HIDDEN))
        w[p + "mlp.down_proj.weight"] = rng.normal(0, 0.15, (HIDDEN, FFN))
    write_safetensors(folder / "model.safetensors", {k: v.astype(np.float32) for k, v in w.items()})
    text = folder.parent / "eval.txt"
    text.write_text(_corpus(600, 1), encoding="utf-8")
    return folder, load_folder(folder), text


@pytest.fixture(scope="module")
def tokens(tiny):
    _, loaded, text = tiny
    toks = ev.tokenize_text(loaded.tokenizer, ev.read_text(text))
    assert len(toks) > 2 * 64 + 1
    return toks


# ---- windows and metrics ------------------------------------------------------------------------------


def test_split_windows_are_consecutive_with_one_target_after():
    toks = np.arange(1000)
    ws = ev.split_windows(toks, 100, 10, max_windows=None)
    assert len(ws) == 9  # (1000 - 1) // 100
    assert all(len(w) == 101 for w in ws)
    assert ws[3][0] == 300 and ws[3][-1] == 400
    assert len(ev.split_windows(toks, 100, 10, max_windows=2)) == 2
    with pytest.raises(InputError):
        ev.split_windows(toks, 100, 100)
    with pytest.raises(InputError):
        ev.split_windows(np.arange(100), 100, 10)


def test_parse_policy_opts():
    assert ev.parse_policy_opts(["budget=0.25", "tier=ada4", "sinks=4", "page-size=16"]) == {
        "budget": 0.25, "tier": "ada4", "sinks": 4, "page_size": 16}
    for bad in (["budget"], ["=3"], ["a b=1"]):
        with pytest.raises(InputError):
            ev.parse_policy_opts(bad)


def test_self_kl_is_zero_with_float32_cache(tiny, tokens):
    _, loaded, _ = tiny
    rep = ev.KLEvaluator(loaded.model, tokens, window=64, eval_tokens=16, max_windows=2).run("full", "float32")
    s = rep.summary()
    assert s["mean_kl"] < 1e-10 and s["max_kl"] < 1e-10
    assert s["top1_agreement"] == 1.0
    assert s["ppl"] == pytest.approx(s["ppl_ref"], rel=1e-9)
    assert s["windows"] == 2 and s["scored_tokens"] == 32


def test_fp16_cache_kl_small_but_positive(tiny, tokens):
    _, loaded, _ = tiny
    s = ev.KLEvaluator(loaded.model, tokens, window=64, eval_tokens=16, max_windows=2).run("full", "float16").summary()
    assert 0 < s["mean_kl"] < 1e-3
    assert s["top1_agreement"] > 0.9
    assert abs(s["ppl_ratio"] - 1) < 1e-2


def test_step_reference_equals_one_shot_all_logits(tiny, tokens):
    _, loaded, _ = tiny
    w = ev.split_windows(tokens, 64, 16, 1)[0]
    steps = ev.reference_logprobs(loaded.model, w, 16, mode="steps")
    chunk = ev.reference_logprobs(loaded.model, w, 16, mode="chunk")
    assert steps.shape == chunk.shape == (16, loaded.model.args.vocab_size)
    assert np.abs(steps - chunk).max() < 1e-5


def test_report_equals_brute_force(tiny, tokens):
    """KL / PPL / top-1 / KV bytes recomputed here with plain loops over the model, no evaluate helpers."""
    _, loaded, _ = tiny
    model, N, E = loaded.model, 64, 16
    rep = ev.KLEvaluator(model, tokens, window=N, eval_tokens=E, max_windows=2).run("full", "float16")
    all_kl, all_nll, all_nll_ref, all_top = [], [], [], []
    for wi in range(2):
        w = tokens[wi * N : (wi + 1) * N + 1]
        rows = {}
        for dtype in ("float32", "float16"):
            cache = make_cache(model.args, n_ctx=N, kv_policy="full", kv_dtype=dtype)
            # one prefill chunk, as evaluate's (256 > N - E): float32 sums in another order would move a
            # KL of ~1e-6 by ~1 %, which is the runtime's noise, not the metric's
            model.forward(w[: N - E], cache)
            rows[dtype] = [log_softmax(model.forward(w[t : t + 1], cache)[-1]).astype(np.float32)
                           for t in range(N - E, N)]
        kls, nll, nll_ref, top = [], [], [], []
        for j in range(E):
            p, q = rows["float32"][j].astype(np.float64), rows["float16"][j].astype(np.float64)
            kls.append(sum(math.exp(a) * (a - b) for a, b in zip(p, q)))
            tgt = int(w[N - E + j + 1])
            nll.append(-q[tgt])
            nll_ref.append(-p[tgt])
            top.append(int(np.argmax(p)) == int(np.argmax(q)))
        row = rep.rows()[wi]
        assert row["mean_kl"] == pytest.approx(np.mean(kls), rel=1e-6, abs=1e-12)
        assert row["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-6)
        assert row["ppl_ref"] == pytest.approx(math.exp(np.mean(nll_ref)), rel=1e-6)
        assert row["top1_agreement"] == pytest.approx(np.mean(top))
        # KV bytes: every page of a 64-token fp16 cache, metadata included, over 64 tokens
        pages = model.args.num_hidden_layers * model.args.num_key_value_heads * math.ceil(N / cache.page_size)
        page_bytes = 2 * cache.page_size * model.args.head_dim * 2 + 4 + 4 * cache.page_size
        assert row["kv_bytes_per_token"] == pytest.approx(pages * page_bytes / N)
        dense = model.args.num_hidden_layers * model.args.num_key_value_heads * 2 * model.args.head_dim * 2
        assert row["kv_bytes_fraction"] == pytest.approx(pages * page_bytes / N / dense)
        all_kl += kls
        all_nll += nll
        all_nll_ref += nll_ref
        all_top += top
    s = rep.summary()
    assert s["mean_kl"] == pytest.approx(np.mean(all_kl), rel=1e-6, abs=1e-12)
    assert s["p99_kl"] == pytest.approx(np.percentile(all_kl, 99), rel=1e-5, abs=1e-12)
    assert s["ppl"] == pytest.approx(math.exp(np.mean(all_nll)), rel=1e-6)
    assert s["ppl_ratio"] == pytest.approx(math.exp(np.mean(all_nll) - np.mean(all_nll_ref)), rel=1e-6)
    assert s["top1_agreement"] == pytest.approx(np.mean(all_top))


def test_token_metrics_against_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 50)), rng.normal(size=(3, 50))
    lp, lq = log_softmax(a), log_softmax(b)
    m = ev.token_metrics(lp, lq, np.array([1, 2, 3]))
    p, q = np.exp(lp), np.exp(lq)
    np.testing.assert_allclose(m["kl"], (p * np.log(p / q)).sum(-1), rtol=1e-10)
    np.testing.assert_allclose(m["nll"], -lq[[0, 1, 2], [1, 2, 3]])
    assert (m["top1"] == (a.argmax(-1) == b.argmax(-1))).all()


def test_reference_store_round_trip(tiny, tokens, tmp_path):
    folder, loaded, _ = tiny
    store = ev.ReferenceStore(tmp_path / "refs", ev.model_fingerprint(folder))
    r1 = ev.KLEvaluator(loaded.model, tokens, 64, 16, 2, ref_store=store, keep_refs=False).run("full", "float16")
    assert len(list((tmp_path / "refs").glob("ref-*.npz"))) == 2
    assert not any(w.ref_cached for w in r1.windows)
    r2 = ev.KLEvaluator(loaded.model, tokens, 64, 16, 2, ref_store=store, keep_refs=False).run("full", "float16")
    assert all(w.ref_cached for w in r2.windows)
    assert r2.summary()["mean_kl"] == r1.summary()["mean_kl"]
    # a different window length is a different key
    r3 = ev.KLEvaluator(loaded.model, tokens, 60, 16, 1, ref_store=store).run("full", "float32")
    assert not r3.windows[0].ref_cached and r3.summary()["mean_kl"] < 1e-10


def test_fingerprint_follows_the_weights_not_the_calibration_sidecar(tmp_path):
    from skvrt.loader import SIDECAR

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"w" * 10)
    (tmp_path / SIDECAR).write_bytes(b"c" * 10)
    first = ev.model_fingerprint(tmp_path)
    (tmp_path / SIDECAR).write_bytes(b"recalibrated" * 3)
    assert ev.model_fingerprint(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"w" * 11)
    assert ev.model_fingerprint(tmp_path) != first


# ---- CLI ------------------------------------------------------------------------------------------------

REQUIRED_KEYS = {"mean_kl", "p99_kl", "ppl", "ppl_ref", "ppl_ratio", "top1_agreement", "kv_bytes_fraction",
                 "kv_bytes_per_token", "windows", "eval_tokens", "policy", "rows"}


def _cli(args):
    from typer.testing import CliRunner

    from skvrt.cli.eval_cmd import eval_app

    res = CliRunner().invoke(eval_app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def test_cli_kl_json(tiny, tmp_path):
    folder, _, text = tiny
    res = _cli(["kl", "--model", str(folder), "--text", str(text), "--window", "64", "--eval-tokens", "16",
                "--max-windows", "2", "--json", "-t", "1", "--kv-opt", "page_size=16",
                "--cache-ref", str(tmp_path / "refs")])
    out = json.loads(res.stdout)
    assert REQUIRED_KEYS <= set(out)
    assert out["windows"] == 2 and out["eval_tokens"] == 16 and out["policy"] == "full"
    assert out["policy_opts"] == {"page_size": 16}  # parsed to int and accepted by make_cache
    assert len(out["rows"]) == 2 and 0 < out["mean_kl"] < 1e-3
    assert 1.0 <= out["kv_bytes_fraction"] < 1.2


def test_cli_ppl_markdown(tiny):
    folder, _, text = tiny
    res = _cli(["ppl", "-m", str(folder), "--text", str(text), "--window", "64", "--eval-tokens", "8",
                "--max-windows", "1", "--kv-dtype", "float32", "-t", "1"])
    assert "| window | PPL | PPL ref |" in res.stdout and "**all**" in res.stdout


def test_cli_bad_policy(tiny):
    from typer.testing import CliRunner

    from skvrt.cli.eval_cmd import eval_app

    folder, _, text = tiny
    res = CliRunner().invoke(eval_app, ["kl", "-m", str(folder), "--text", str(text), "--kv-policy", "nope"])
    assert res.exit_code != 0 and isinstance(res.exception, InputError)


# ---- passkey ----------------------------------------------------------------------------------------------


def test_parse_lengths_and_depths():
    assert ev.parse_lengths("1k,2k,4k,7.5k") == [1024, 2048, 4096, 7680]
    assert ev.parse_lengths("3000") == [3000]
    assert ev.parse_depths("10,50,90") == [0.1, 0.5, 0.9]
    assert ev.parse_depths("0.25") == [0.25]
    with pytest.raises(InputError):
        ev.parse_lengths("1.3x")


@pytest.mark.parametrize("length", [1024, 2048, 7680])
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_prompt_length_and_depth(tiny, length, depth):
    tok = tiny[1].tokenizer
    p = ev.build_passkey_prompt(tok, length, depth, "48151")
    assert abs(len(p.ids) - length) <= 0.02 * length
    assert abs(p.key_fraction - depth) <= 0.05
    needle = tok.encode(" " + ev.passkey_needle("48151"), add_bos=False)
    assert p.ids[p.key_pos : p.key_pos + len(needle)] == needle
    text = tok.decode(p.ids)
    assert text.startswith(ev.PASSKEY_INTRO) and text.endswith(ev.PASSKEY_QUESTION)
    assert text.count("48151") == 2


def test_passkey_prompts_seeded_and_answers():
    assert ev.passkey_answer_ok(" 48151. Remember", "48151")
    assert not ev.passkey_answer_ok(" the pass key", "48151")
    assert not ev.passkey_answer_ok(" 481512", "48151")


def test_run_passkey_and_cli(tiny):
    folder, loaded, _ = tiny
    prompts = ev.passkey_prompts(loaded.tokenizer, [256], [0.5], trials=2, seed=1)
    assert prompts[0].key != prompts[1].key
    assert [p.key for p in ev.passkey_prompts(loaded.tokenizer, [256], [0.5], 2, 1)] == [p.key for p in prompts]
    res = ev.run_passkey(loaded.model, loaded.tokenizer, prompts, "full", "float16", max_new_tokens=4)
    assert len(res) == 2 and all(isinstance(r["correct"], bool) for r in res)
    assert ev.passkey_table(res)[(256, 0.5)][1] == 2
    out = json.loads(_cli(["passkey", "-m", str(folder), "--lengths", "256", "--depths", "50", "--trials", "1",
                           "--kv-dtype", "float32", "--compare-full", "--json", "-t", "1"]).stdout)
    assert set(out["policies"]) == {"full (float32)", "full"}
    md = _cli(["passkey", "-m", str(folder), "--lengths", "256", "--depths", "10,90", "--trials", "1"]).stdout
    assert "| 256 | 10% |" in md and "| 256 | all |" in md
