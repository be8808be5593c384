"""GPT-2 benchmark jobs for the shared harness (onnxforge/bench.py): one job per variant.

A run is a prefill of a fixed `prompt_tokens`-token prompt, then `new_tokens` greedy decode steps;
`runs` timed runs after `warmup` untimed ones. Runtime only (numpy + onnxruntime), like a user's program.
"""

from __future__ import annotations

import time

import numpy as np

PROMPT_TEXT = "A quiet harbor at dawn, fishing boats resting on silver water while gulls circle the old stone pier. "

SETTINGS = {
    "runs": (100, int, "timed runs per variant"),
    "warmup": (3, int, "untimed runs first"),
    "prompt_tokens": (32, int, "prompt length in tokens"),
    "new_tokens": (50, int, "tokens decoded per run"),
}
HEADERS = ("prefill ms p50", "decode ms/tok mean", "p50", "p95", "tok/s", "peak RSS MiB", "size MiB", "parameters")
PANELS = (("decode ms/token (mean)", lambda r: r["decode_ms_per_token"]["mean"]),
          ("prefill ms (p50)", lambda r: r["prefill_ms"]["p50"]),
          ("peak RSS MiB", lambda r: r["peak_rss_mib"]),
          ("size on disk MiB", lambda r: r["size_mib"]))


def check(s: dict) -> None:
    if s["runs"] < 1 or s["warmup"] < 0 or s["new_tokens"] < 2 or s["prompt_tokens"] < 1:
        raise ValueError("runs must be >= 1, warmup >= 0, new tokens >= 2 and prompt tokens >= 1")


def jobs(manifest: dict, s: dict) -> list[dict]:
    context = manifest["runtime"]["context_length"]
    if s["prompt_tokens"] + s["new_tokens"] > context:
        raise ValueError(f"prompt {s['prompt_tokens']} + new {s['new_tokens']} tokens exceed the context ({context})")
    return [{"what": "decode", **s}]


def child(job: dict, a) -> dict:
    from tokenizers import Tokenizer

    from ...bench import peak_rss_mib, stats
    from ...runtime.text import CausalLM

    t0 = time.perf_counter()
    lm = CausalLM(a.session("decoder", threads=job["threads"]), a.runtime["context_length"])
    load_s = time.perf_counter() - t0
    ids = Tokenizer.from_file(str(a.dir / a.runtime["tokenizer"])).encode(PROMPT_TEXT).ids
    prompt = (ids * (job["prompt_tokens"] // max(1, len(ids)) + 1))[:job["prompt_tokens"]]
    prefill, decode = [], []
    for i in range(job["warmup"] + job["runs"]):
        stream = lm.decode(prompt)
        t = time.perf_counter()
        logits = next(stream)
        first = (time.perf_counter() - t) * 1e3
        steps = []
        for _ in range(job["new_tokens"] - 1):
            t = time.perf_counter()
            logits = stream.send(int(np.argmax(logits)))
            steps.append((time.perf_counter() - t) * 1e3)
        if i >= job["warmup"]:
            prefill.append(first)
            decode.extend(steps)
    d = stats(decode)
    return {"load_s": round(load_s, 3), "prefill_ms": stats(prefill), "decode_ms_per_token": d,
            "tokens_per_s": round(1e3 / d["mean"], 2), "peak_rss_mib": peak_rss_mib()}


def parameter_count(manifest: dict) -> int | None:
    """Parameters of the model the artifact holds: after pruning if it was pruned."""
    stages = {s["stage"]: s for s in manifest["stages"]}
    if "prune" in stages:
        return stages["prune"].get("parameters_after")
    return stages.get("source", {}).get("parameters")


def collect(manifest: dict, done: list) -> dict:
    (_, r), = done
    return {**r, "size_mib": round(manifest["artifact"]["bytes_on_disk"] / 2**20, 2),
            "parameters": parameter_count(manifest)}


def ratios(results: dict) -> dict:
    out = {}
    dec = {k: v["decode_ms_per_token"]["mean"] for k, v in results.items()}
    size = {k: v["size_mib"] for k, v in results.items()}
    if "base" in dec and "kv" in dec:
        out["kv_decode_speedup_over_base"] = round(dec["base"] / dec["kv"], 3)
    if "kv" in dec and "kv-int8" in dec:
        out["int8_decode_speedup_over_kv"] = round(dec["kv"] / dec["kv-int8"], 3)
        out["int8_size_fraction_of_kv"] = round(size["kv-int8"] / size["kv"], 4)
    if "kv" in dec and "pruned" in dec:
        out["pruned_decode_speedup_over_kv"] = round(dec["kv"] / dec["pruned"], 3)
        out["pruned_size_fraction_of_kv"] = round(size["pruned"] / size["kv"], 4)
    return out


def rows(name: str, r: dict) -> list[list[str]]:
    d = r["decode_ms_per_token"]
    return [[f"{r['prefill_ms']['p50']:.1f}", f"{d['mean']:.2f}", f"{d['p50']:.2f}", f"{d['p95']:.2f}",
             f"{r['tokens_per_s']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['size_mib']:.1f}", f"{r['parameters'] or '?'}"]]


def summary(r: dict) -> dict:
    return {k: r[k] for k in ("prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_rss_mib", "size_mib", "load_s")}


def describe(b: dict) -> str:
    d = b["decode_ms_per_token"]
    return (f"decode {d['mean']:.2f} ms/token mean (p50 {d['p50']:.2f}, p95 {d['p95']:.2f}, n {d['n']}), "
            f"prefill p50 {b['prefill_ms']['p50']:.1f} ms, {b['tokens_per_s']} tokens/s, peak RSS {b['peak_rss_mib']} MiB")


# ---- budget checks (onnxforge/budgets.py): the figures a recipe's budgets may name, and a short fixed workload ----

FIGURES = {
    "decode_ms": "median ms per decoded token (with the KV cache when the graph has one)",
    "prefill_ms": "p50 ms of the prompt's first pass",
}
# A long prompt, so a decoder that recomputes the whole sequence per token shows it plainly.
CHECK = {"runs": 2, "warmup": 1, "prompt_tokens": 96, "new_tokens": 16}


def check_jobs(manifest: dict, figures: set[str]) -> list[dict]:
    return jobs(manifest, CHECK) if figures else []


def check_figures(manifest: dict, done: list) -> dict:
    if not done:  # only size budgets: nothing was run
        return {}
    (_, r), = done
    return {"decode_ms": r["decode_ms_per_token"]["p50"], "prefill_ms": r["prefill_ms"]["p50"]}
