"""The torch-free text runtime: sampling, seeds, stop strings, CLI, benchmark."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from onnxforge.runtime.text import SamplingSettings, TextGenerator, pick_token

from conftest import run_cli


def test_runtime_loads_and_generates_without_torch(tiny):
    code = f"""
import sys
from onnxforge.runtime.text import TextGenerator, SamplingSettings
g = TextGenerator({str(tiny.variant('kv'))!r})
g.generate('lighthouse', SamplingSettings(seed=1, max_new_tokens=8))
heavy = sorted(m for m in ('torch', 'transformers', 'diffusers', 'optimum') if m in sys.modules)
print('HEAVY', heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


@pytest.fixture(scope="module")
def gen(tiny):
    return TextGenerator(tiny.variant("kv"))


def test_same_seed_same_text_and_template_applied(gen):
    s = SamplingSettings(seed=7, max_new_tokens=24)
    a, b = gen.generate("lighthouse", s), gen.generate("lighthouse", s)
    assert a.text == b.text and a.token_ids == b.token_ids
    assert a.prompt == "A detailed, imaginative painting of lighthouse,"
    assert a.text.startswith(a.prompt) and len(a.token_ids) == 24
    others = {tuple(gen.generate("lighthouse", SamplingSettings(seed=k, max_new_tokens=24)).token_ids) for k in range(5)}
    assert len(others) > 1, "different seeds should give different samples"


def test_greedy_and_top_k_one_agree(gen):
    greedy = gen.generate("forest", SamplingSettings(greedy=True, repetition_penalty=1.0, max_new_tokens=16))
    top1 = gen.generate("forest", SamplingSettings(top_k=1, repetition_penalty=1.0, seed=3, max_new_tokens=16))
    assert greedy.token_ids == top1.token_ids


def test_stop_string_cuts_the_text(gen):
    full = gen.generate("forest", SamplingSettings(greedy=True, max_new_tokens=40))
    completion = full.text[len(full.prompt):]
    stop = completion.strip().split()[2]  # a word the model will write
    cut = gen.generate("forest", SamplingSettings(greedy=True, max_new_tokens=40, stop=(stop,)))
    assert cut.finish_reason == "stop" and stop not in cut.text[len(cut.prompt):]
    assert full.text.startswith(cut.text)


def test_raw_prompt_and_eos(tiny):
    """Issue 10, item 22: a raw prompt is used as given, and generation stops at the EOS token (not counted)."""
    gen = TextGenerator(tiny.variant("kv"))
    greedy = SamplingSettings(greedy=True, max_new_tokens=5)
    raw = gen.generate("The dragon", greedy, use_template=False)
    assert raw.prompt == "The dragon" and raw.finish_reason == "length" and len(raw.token_ids) == 5
    gen.eos_id = raw.token_ids[2]  # make the third greedy token the end of text
    stopped = gen.generate("The dragon", greedy, use_template=False)
    assert stopped.finish_reason == "eos" and stopped.token_ids == raw.token_ids[:2]


def test_pick_token_penalties_and_filters():
    rng = np.random.default_rng(0)
    logits = np.array([2.0, 1.9, -1.0, 0.5])
    greedy = SamplingSettings(greedy=True, repetition_penalty=1.0)
    assert pick_token(logits, [], greedy, rng) == 0
    # token 0 seen: 2.0 / 1.5 < 1.9, so the penalty moves the argmax
    assert pick_token(logits, [0], SamplingSettings(greedy=True, repetition_penalty=1.5), rng) == 1
    # nucleus with tiny mass keeps only the top token
    picks = {pick_token(logits, [], SamplingSettings(top_p=0.01, repetition_penalty=1.0), rng) for _ in range(50)}
    assert picks == {0}
    # top-k 2 never yields tokens 2 or 3
    picks = {pick_token(logits, [], SamplingSettings(top_k=2, temperature=5.0, top_p=1.0, repetition_penalty=1.0), rng)
             for _ in range(200)}
    assert picks == {0, 1}


def test_cli_generate_and_inspect(tiny):
    proc = run_cli("generate", "lighthouse", "--artifact", str(tiny.variant("kv")), "--seed", "1", "--json", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["text"].startswith("A detailed, imaginative painting of lighthouse,") and rec["tokens"] <= 12
    again = json.loads(run_cli("generate", "lighthouse", "--artifact", str(tiny.variant("kv")), "--seed", "1", "--json",
                               "--max-tokens", "12").stdout)
    assert again["text"] == rec["text"]
    shown = run_cli("inspect", str(tiny.variant("pruned")))
    assert shown.returncode == 0
    for word in ("gpt2-tiny / pruned", "prune", "perplexity", "past_key_values.0.key", "validation: passed"):
        assert word in shown.stdout


def test_bench_measures_every_variant_and_records_it(tiny, tmp_path):
    out = tmp_path / "bench"
    proc = run_cli("bench", "--recipe", "gpt2-tiny", "--artifacts", str(tiny.artifacts), "--runs", "3", "--warmup", "1",
                   "--new-tokens", "6", "--prompt-tokens", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "bench.json").read_text())
    assert set(report["variants"]) == {"base", "kv", "pruned", "kv-int8"}
    for r in report["variants"].values():
        assert r["prefill_ms"]["n"] == 3 and r["decode_ms_per_token"]["n"] == 3 * 5
        assert r["peak_rss_mib"] > 10 and r["size_mib"] > 0 and r["tokens_per_s"] > 0
    assert {"kv_decode_speedup_over_base", "int8_size_fraction_of_kv"} <= set(report["ratios"])
    assert (out / "bench.png").stat().st_size > 1000
    manifest = json.loads((tiny.variant("kv") / "manifest.json").read_text())
    assert manifest["benchmark"]["settings"]["runs"] == 3
    assert "decode ms/tok" in proc.stdout
