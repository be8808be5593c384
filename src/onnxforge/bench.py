"""Text benchmark: each variant in its own process (so peak RSS is its own), one run, ratios.

Per variant: `runs` timed runs after `warmup` untimed ones; a run is a prefill
of a fixed `prompt_tokens`-token prompt, then `new_tokens` greedy decode steps.
Uses only the runtime (numpy + onnxruntime), like a user's program would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .runtime import artifact as art
from .runtime.text import CausalLM


def machine(threads: int | None) -> dict:
    """What the figures were measured on: int8 speed depends on the CPU's int8 instructions (VNNI or not)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {"cpu": model, "simd": simd, "cpu_count": os.cpu_count(), "ort_threads": threads or "default",
            "platform": sys.platform}

PROMPT_TEXT = "A quiet harbor at dawn, fishing boats resting on silver water while gulls circle the old stone pier. "


def stats(values_ms: list[float]) -> dict:
    a = np.asarray(values_ms)
    return {"mean": round(float(a.mean()), 3), "p50": round(float(np.percentile(a, 50)), 3),
            "p95": round(float(np.percentile(a, 95)), 3), "n": int(a.size)}


def bench_one(path: str, runs: int, warmup: int, prompt_tokens: int, new_tokens: int, threads: int | None) -> dict:
    """Runs in a child process: load, warm up, time."""
    import resource

    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    a = art.load(path)
    lm = CausalLM(a.session("decoder", threads=threads), a.runtime["context_length"])
    load_s = time.perf_counter() - t0
    tok = Tokenizer.from_file(str(a.dir / a.runtime["tokenizer"]))
    ids = tok.encode(PROMPT_TEXT).ids
    prompt = (ids * (prompt_tokens // max(1, len(ids)) + 1))[:prompt_tokens]
    if prompt_tokens + new_tokens > lm.context_length:
        raise ValueError(f"prompt {prompt_tokens} + new {new_tokens} tokens exceed the context ({lm.context_length})")
    prefill, decode = [], []
    for i in range(warmup + runs):
        stream = lm.decode(prompt)
        t = time.perf_counter()
        logits = next(stream)
        first = (time.perf_counter() - t) * 1e3
        steps = []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            logits = stream.send(int(np.argmax(logits)))
            steps.append((time.perf_counter() - t) * 1e3)
        if i >= warmup:
            prefill.append(first)
            decode.extend(steps)
    d = stats(decode)
    return {
        "variant": a.manifest["artifact"]["variant"],
        "version": a.manifest["artifact"]["version"],
        "artifact": str(a.dir),
        "load_s": round(load_s, 3),
        "prefill_ms": stats(prefill),
        "decode_ms_per_token": d,
        "tokens_per_s": round(1e3 / d["mean"], 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "size_mib": round(a.manifest["artifact"]["bytes_on_disk"] / 2**20, 2),
        "parameters": parameter_count(a.manifest),
    }


def parameter_count(manifest: dict) -> int | None:
    """Parameters of the model the artifact holds: after pruning if it was pruned."""
    stages = {s["stage"]: s for s in manifest["stages"]}
    if "prune" in stages:
        return stages["prune"].get("parameters_after")
    return stages.get("source", {}).get("parameters")


def bench_variants(paths: dict[str, Path], out_dir: Path, runs: int = 100, warmup: int = 3, prompt_tokens: int = 32,
                   new_tokens: int = 50, threads: int | None = None, update_manifests: bool = True) -> dict:
    from tqdm import tqdm

    results = {}
    for name, path in tqdm(paths.items(), desc="bench variants", unit="variant"):
        cmd = [sys.executable, "-m", "onnxforge.bench", str(path), str(runs), str(warmup), str(prompt_tokens),
               str(new_tokens), str(threads or 0)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark of {name} ({path}) failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    report = {
        "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(threads),
        "settings": {"runs": runs, "warmup": warmup, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens},
        "variants": results,
        "ratios": ratios(results),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out_dir / "bench.png")
    print(table(report))
    if update_manifests:
        for name, r in results.items():
            mpath = Path(r["artifact"]) / art.MANIFEST
            manifest = json.loads(mpath.read_text())
            manifest["benchmark"] = {k: r[k] for k in ("prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_rss_mib",
                                                       "size_mib", "load_s")} | {"settings": report["settings"],
                                                                                 "measured": report["measured"],
                                                                                 "report": str(out_dir / "bench.json")}
            art.write_json_atomic(mpath, manifest)
    return report


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


def table(report: dict) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    t = Table(title=f"GPT-2 variants: {s['runs']} runs, prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens")
    for col in ("variant", "prefill ms p50", "decode ms/tok mean", "p50", "p95", "tok/s", "peak RSS MiB", "size MiB"):
        t.add_column(col, justify="right")
    for name, r in report["variants"].items():
        d = r["decode_ms_per_token"]
        t.add_row(name, f"{r['prefill_ms']['p50']:.1f}", f"{d['mean']:.2f}", f"{d['p50']:.2f}", f"{d['p95']:.2f}",
                  f"{r['tokens_per_s']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['size_mib']:.1f}")
    buf = StringIO()
    Console(file=buf, width=120).print(t)
    lines = [buf.getvalue()] + [f"{k}: {v}" for k, v in report["ratios"].items()]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    v = report["variants"]
    panels = [("decode ms/token (mean)", [v[n]["decode_ms_per_token"]["mean"] for n in names]),
              ("prefill ms (p50)", [v[n]["prefill_ms"]["p50"] for n in names]),
              ("peak RSS MiB", [v[n]["peak_rss_mib"] for n in names]),
              ("size on disk MiB", [v[n]["size_mib"] for n in names])]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(names)])
        ax.set_title(title)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{report['settings']['runs']} runs, {report['machine']['cpu_count']} CPUs ({report['machine'].get('cpu', '?')}), {report['measured']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # child process entry: one variant
    p, runs, warmup, prompt_tokens, new_tokens, threads = sys.argv[1:7]
    print(json.dumps(bench_one(p, int(runs), int(warmup), int(prompt_tokens), int(new_tokens), int(threads) or None)))
