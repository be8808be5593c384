"""Stable Diffusion benchmark: every measurement in its own process (so peak RSS is its own), one run.

Per variant, with the runtime alone (numpy + onnxruntime), like a user's program:
  text_encoder   one call at batch 2 x 77 tokens (prompt + negative prompt)
  unet           one denoising step with guidance (batch 2) at each of `sizes` (square, px)
  vae_decoder    latents -> picture at each size (batch 1)
  vae_encoder    picture -> latents at each size (batch 1)
  image          a whole picture: `image_steps` steps at `image_size` px (text encoder, UNet
                 steps, VAE decoder), sessions loaded once as the runtime does by default
Each: load time, `runs` timed calls after `warmup` untimed ones, peak RSS of the process.
Sizes on disk per component come from the manifests. Ratios (fp32 / variant) are computed between
variants measured in the same run; nothing here is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .bench import machine, stats

SUBMODULES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def _rss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _inputs(name: str, rt: dict, size: int) -> dict:
    rng = np.random.default_rng(0)
    f, c, d, n = rt["vae_scale_factor"], rt["latent_channels"], rt["text_hidden_size"], rt["max_length"]
    if name == "text_encoder":
        ids = np.full((2, n), rt["pad_id"], np.int64)
        ids[:, 0], ids[:, 1:20] = rt["bos_id"], rng.integers(0, 300, (2, 19))
        ids[:, 20] = rt["eos_id"]
        return {"input_ids": ids}
    if name == "unet":
        return {"sample": rng.standard_normal((2, c, size // f, size // f), dtype=np.float32),
                "timestep": np.full(2, 500.0, np.float32),
                "encoder_hidden_states": rng.standard_normal((2, n, d), dtype=np.float32)}
    if name == "vae_decoder":
        return {"latent_sample": rng.standard_normal((1, c, size // f, size // f), dtype=np.float32) * 5}
    return {"sample": rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)}


def bench_one(job: dict) -> dict:
    """Runs in a child process: one submodule at one size, or one whole picture."""
    from .runtime import artifact as art

    a = art.load(job["path"], check_hashes=False)
    rt = a.runtime
    if job["what"] == "image":
        from .runtime.sd import StableDiffusion

        t0 = time.perf_counter()
        sd = StableDiffusion(a, threads=job["threads"], low_memory=job["low_memory"])
        load_s = time.perf_counter() - t0
        size, totals, per_step = job["size"], [], []
        for i in range(job["warmup"] + job["runs"]):
            g = sd.generate("a lighthouse on a rocky cliff at dusk, oil painting", steps=job["steps"], seed=i,
                            width=size, height=size)
            if i >= job["warmup"]:
                totals.append(g.timings["total_s"] * 1e3)
                per_step.append(g.timings["unet_s_per_step"] * 1e3)
        return {"load_s": round(load_s, 3), "image_ms": stats(totals), "unet_step_ms_in_image": stats(per_step),
                "unet_calls": g.timings["unet_steps"], "low_memory": job["low_memory"],
                "peak_rss_mib": _rss_mib()}
    name = job["what"]
    t0 = time.perf_counter()
    session = a.session(name, threads=job["threads"])
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mib()
    inputs = _inputs(name, rt, job["size"])
    times = []
    for i in range(job["warmup"] + job["runs"]):
        t = time.perf_counter()
        session.run(None, inputs)
        if i >= job["warmup"]:
            times.append((time.perf_counter() - t) * 1e3)
    return {"load_s": round(load_s, 3), "ms": stats(times), "peak_rss_mib_after_load": rss_loaded,
            "peak_rss_mib": _rss_mib()}


def _modes(manifest: dict) -> dict:
    quant = next((s for s in manifest["stages"] if s["stage"] == "quantize"), None)
    return {n: quant["submodules"][n]["mode"] if quant else "float" for n in manifest["components"]}


def _child(job: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "onnxforge.bench_sd", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        raise RuntimeError(f"benchmark {job['what']} of {job['path']} failed: {err[-1] if err else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_variants(paths: dict[str, Path], out_dir: Path, sizes: tuple[int, ...] = (256, 512), runs: int = 3,
                   warmup: int = 1, image_size: int | None = None, image_steps: int = 25, image_runs: int = 1,
                   image_low_memory: bool = False, threads: int | None = None, update_manifests: bool = False) -> dict:
    """update_manifests: also write each variant's figures into its manifest's `benchmark` block (off by
    default: `onnxforge inspect` still reads that block in the GPT-2 layout)."""
    from tqdm import tqdm

    from .runtime import artifact as art

    results: dict = {}
    jobs = []
    for name, path in paths.items():
        a = art.load(path, check_hashes=False)
        m = a.manifest
        results[name] = {"variant": m["artifact"]["variant"], "version": m["artifact"]["version"], "artifact": str(a.dir),
                         "component_mib": {n: round(sum(f["bytes"] for f in c["files"]) / 2**20, 2)
                                           for n, c in m["components"].items()},
                         "modes": _modes(m), "submodules": {}, "image": None}
        results[name]["size_mib"] = round(sum(results[name]["component_mib"].values()), 2)
        base = {"path": str(a.dir), "runs": runs, "warmup": warmup, "threads": threads}
        jobs.append((name, "text_encoder", None, {**base, "what": "text_encoder", "size": 0}))
        for sub in ("unet", "vae_decoder", "vae_encoder"):
            for size in sizes:
                jobs.append((name, sub, size, {**base, "what": sub, "size": size}))
        if image_steps > 0:
            size = image_size or m["runtime"]["width"]  # default: the picture size the recipe ships with
            jobs.append((name, "image", size, {**base, "what": "image", "size": size, "steps": image_steps,
                                               "runs": image_runs, "warmup": 0, "low_memory": image_low_memory}))
    for name, what, size, job in tqdm(jobs, desc="bench", unit="job", disable=None):
        r = _child(job)
        if what == "image":
            results[name]["image"] = {"size": size, "steps": image_steps, **r}
        else:
            results[name]["submodules"].setdefault(what, {})[str(size) if size else "77 tokens"] = r
    report = {
        "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(threads),
        "settings": {"sizes": list(sizes), "runs": runs, "warmup": warmup, "image_size": image_size,
                     "image_steps": image_steps, "image_runs": image_runs,
                     "image_low_memory": image_low_memory, "unet_batch": 2},
        "variants": results,
        "ratios": ratios(results),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(report)
    (out_dir / "bench.md").write_text(text + "\n")
    plot(report, out_dir / "bench.png")
    print(text)
    if update_manifests:
        for name, r in results.items():
            mpath = Path(r["artifact"]) / art.MANIFEST
            manifest = json.loads(mpath.read_text())
            manifest["benchmark"] = {"submodules": r["submodules"], "image": r["image"], "size_mib": r["size_mib"],
                                     "settings": report["settings"], "measured": report["measured"],
                                     "report": str(out_dir / "bench.json")}
            art.write_json_atomic(mpath, manifest)
    return report


def ratios(results: dict) -> dict:
    """Speed-up and size fraction of each variant against fp32 (measured in this run)."""
    out: dict = {}
    if "fp32" not in results:
        return out
    ref = results["fp32"]
    for name, r in results.items():
        if name == "fp32":
            continue
        entry = {"size_fraction": round(r["size_mib"] / ref["size_mib"], 4)}
        for sub, by_size in r["submodules"].items():
            for size, v in by_size.items():
                base = ref["submodules"].get(sub, {}).get(size)
                if base:
                    entry[f"{sub}@{size} speedup"] = round(base["ms"]["mean"] / v["ms"]["mean"], 3)
        if r["image"] and ref["image"]:
            entry["image speedup"] = round(ref["image"]["image_ms"]["mean"] / r["image"]["image_ms"]["mean"], 3)
        out[name] = entry
    return out


def table(report: dict) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    t = Table(title=f"Stable Diffusion variants: {s['runs']} runs after {s['warmup']} warm-up; UNet with guidance (batch 2)")
    for col in ("variant", "submodule", "size", "mode", "ms mean", "p50", "p95", "peak RSS MiB", "load s", "MiB on disk"):
        t.add_column(col, justify="right")
    for name, r in report["variants"].items():
        for sub, by_size in r["submodules"].items():
            for size, v in by_size.items():
                t.add_row(name, sub, size, r["modes"].get(sub, "?"), f"{v['ms']['mean']:.1f}", f"{v['ms']['p50']:.1f}",
                          f"{v['ms']['p95']:.1f}", f"{v['peak_rss_mib']:.0f}", f"{v['load_s']:.2f}",
                          f"{r['component_mib'].get(sub, 0):.1f}")
        if r["image"]:
            im = r["image"]
            mode = "low-memory" if im["low_memory"] else ""
            t.add_row(name, f"whole image ({im['steps']} steps)", str(im["size"]), mode, f"{im['image_ms']['mean']:.0f}",
                      f"{im['image_ms']['p50']:.0f}", f"{im['image_ms']['p95']:.0f}", f"{im['peak_rss_mib']:.0f}",
                      f"{im['load_s']:.2f}", f"{r['size_mib']:.1f}")
    buf = StringIO()
    Console(file=buf, width=160).print(t)
    lines = [buf.getvalue()] + [f"{k}: {json.dumps(v)}" for k, v in report["ratios"].items()]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = report["variants"]
    names = list(v)
    sizes = [str(s) for s in report["settings"]["sizes"]]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    width = 0.8 / max(1, len(names))
    panels = [("UNet step ms (batch 2)", "unet"), ("VAE decoder ms", "vae_decoder")]
    for ax, (title, sub) in zip(axes[:2], panels):
        for i, n in enumerate(names):
            vals = [v[n]["submodules"].get(sub, {}).get(s, {}).get("ms", {}).get("mean", 0) for s in sizes]
            bars = ax.bar(np.arange(len(sizes)) + i * width, vals, width, label=n)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(np.arange(len(sizes)) + width * (len(names) - 1) / 2, [f"{s} px" for s in sizes])
        ax.set_title(title)
        ax.legend(fontsize=7)
    comps = list(SUBMODULES)
    for i, n in enumerate(names):
        bars = axes[2].bar(np.arange(len(comps)) + i * width, [v[n]["component_mib"].get(c, 0) for c in comps], width, label=n)
        axes[2].bar_label(bars, fmt="%.0f", fontsize=7)
    axes[2].set_xticks(np.arange(len(comps)) + width * (len(names) - 1) / 2, comps, rotation=15)
    axes[2].set_title("MiB on disk")
    axes[2].legend(fontsize=7)
    rss = [max((x["peak_rss_mib"] for x in v[n]["submodules"].get("unet", {}).values()), default=0) for n in names]
    img = [v[n]["image"]["image_ms"]["mean"] / 1e3 if v[n]["image"] else 0 for n in names]
    ax = axes[3]
    bars = ax.bar(names, img, color="#55a868")
    ax.bar_label(bars, fmt="%.1f s", fontsize=8)
    sizes_px = sorted({v[n]["image"]["size"] for n in names if v[n]["image"]})
    ax.set_title(f"whole image ({report['settings']['image_steps']} steps, {'/'.join(map(str, sizes_px))} px)")
    ax2 = ax.twinx()
    ax2.plot(names, rss, "o--", color="#c44e52")
    ax2.set_ylabel("UNet peak RSS MiB", color="#c44e52")
    fig.suptitle(f"{report['machine']['cpu_count']} CPUs ({report['machine'].get('cpu', '?')}), {report['measured']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # child process entry: one job
    print(json.dumps(bench_one(json.loads(sys.argv[1]))))
