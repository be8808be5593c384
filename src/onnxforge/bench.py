"""One benchmark harness for every family.

Each measurement runs in its own child process (a JSON job in, a JSON result out: peak RSS is the job's
own), all variants of a comparison in one run so that ratios compare like with like. The family's bench
module (Family.bench) supplies only what differs:

    SETTINGS                      {name: (default, parse, help)}: the knobs, also the CLI's options
    check(settings)               ValueError on absurd settings
    jobs(manifest, settings)      the child jobs for one artifact (dicts; the harness adds path, threads)
    child(job, artifact)          runs in the child: one measurement -> dict
    collect(manifest, done)       one variant's result from its [(job, result)]
    ratios(results)               comparisons between variants measured in this run
    HEADERS, rows(name, result)   its table; PANELS [(title, fn(result) -> number)] its chart
    summary(result)               the block written back into the artifact's manifest
    describe(block)               one line for `onnxforge inspect`

Nothing here is asserted; targets live in the reports (docs/benchmarks/), never in timed tests.
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


def stats(values_ms: list[float]) -> dict:
    """mean, p50 and p95 of n timings (ms); with few runs p95 is interpolated between the largest two."""
    a = np.asarray(values_ms, dtype=np.float64)
    return {"mean": round(float(a.mean()), 3), "p50": round(float(np.percentile(a, 50)), 3),
            "p95": round(float(np.percentile(a, 95)), 3), "n": int(a.size)}


def peak_rss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def family_of(manifest: dict, where: Path):
    from .families import FAMILIES, family_of_kind

    fam = FAMILIES.get(manifest["artifact"].get("family")) or family_of_kind(manifest.get("runtime", {}).get("kind", ""))
    if fam is None or fam.bench is None:
        raise ValueError(f"{where}: no benchmark for this artifact's family ({manifest['artifact'].get('family')!r})")
    return fam


def settings_for(fam, given: dict) -> dict:
    """The family's defaults updated with the options given (None = not given); unknown options refused."""
    known = fam.bench.SETTINGS
    extra = sorted(k for k, v in given.items() if v is not None and k not in known)
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise ValueError(f"{flags}: not an option of the {fam.name} benchmark (it takes "
                         f"{', '.join('--' + k.replace('_', '-') for k in known)})")
    s = {k: (given[k] if given.get(k) is not None else default) for k, (default, _, _) in known.items()}
    fam.bench.check(s)
    return s


def run_child(job: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "onnxforge.bench", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        raise RuntimeError(f"benchmark job {job.get('what', '')} of {job['path']} failed: {err[-1] if err else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_variants(paths: dict[str, Path], out_dir: Path, settings: dict | None = None, threads: int | None = None,
                   update_manifests: "bool | set" = True) -> dict:
    """Measure every artifact in `paths` (name -> variant or version folder) in one run; JSON, table, chart."""
    from tqdm import tqdm

    if not paths:
        raise ValueError("nothing to benchmark: no built artifact given")
    manifests = {name: art.load(p, check_hashes=False) for name, p in paths.items()}
    fams = {name: family_of(a.manifest, a.dir) for name, a in manifests.items()}
    families = {f.name: f for f in fams.values()}
    # Families that share one benchmark module (SAM and SAM 2) compare in one run.
    if len({id(f.bench) for f in families.values()}) != 1:
        raise ValueError(f"compare artifacts of one family at a time (got {', '.join(sorted(families))})")
    fam = next(iter(families.values()))
    s = settings_for(fam, settings or {})
    jobs = [(name, {**job, "family": fams[name].name, "path": str(a.dir), "threads": threads})
            for name, a in manifests.items() for job in fam.bench.jobs(a.manifest, s)]
    done: dict[str, list] = {name: [] for name in manifests}
    for name, job in tqdm(jobs, desc=f"bench {fam.name}", unit="job", disable=None):
        done[name].append((job, run_child(job)))
    results = {name: {"variant": a.manifest["artifact"]["variant"], "version": a.manifest["artifact"]["version"],
                      "artifact": str(a.dir), **fam.bench.collect(a.manifest, done[name])}
               for name, a in manifests.items()}
    report = {"measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "family": "+".join(sorted(families)), "machine": machine(threads),
              "settings": s, "variants": results, "ratios": fam.bench.ratios(results)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(report, fam)
    (out_dir / "bench.md").write_text(text + "\n")
    print(text)
    try:
        plot(report, fam, out_dir / "bench.png")
    except ImportError:  # matplotlib comes with the build extra; the JSON and table do not need it
        print("no chart: matplotlib is not installed (pip install 'onnxforge[build]')")
    if update_manifests:
        record = set(results) if update_manifests is True else set(update_manifests)
        for name, r in results.items():
            if name not in record:
                continue
            mpath = Path(r["artifact"]) / art.MANIFEST
            manifest = json.loads(mpath.read_text())
            manifest["benchmark"] = {**fam.bench.summary(r), "settings": s, "measured": report["measured"],
                                     "machine": report["machine"]["cpu"], "report": str(out_dir / "bench.json")}
            art.write_json_atomic(mpath, manifest)
    return report


def table(report: dict, fam) -> str:
    """A Markdown table: readable in a terminal, pasteable into docs/benchmarks/."""
    m = report["machine"]
    settings = ", ".join(f"{k} {v}" for k, v in report["settings"].items())
    lines = [f"{fam.description} — {settings}; {m['cpu_count']} CPUs ({m['cpu']}, {' '.join(m['simd'])}), "
             f"{report['measured']}", "",
             "| variant | " + " | ".join(fam.bench.HEADERS) + " |", "|---" * (len(fam.bench.HEADERS) + 1) + "|"]
    for name, r in report["variants"].items():
        for row in fam.bench.rows(name, r):
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"- {k}: {json.dumps(v)}" for k, v in report["ratios"].items()]
    return "\n".join(lines)


def plot(report: dict, fam, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    panels = fam.bench.PANELS
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, value) in zip(np.atleast_1d(axes), panels):
        values = [value(report["variants"][n]) or 0 for n in names]
        bars = ax.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"][:len(names)])
        ax.set_title(title)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.tick_params(axis="x", rotation=20)
    m = report["machine"]
    fig.suptitle(f"{fam.description}: {m['cpu_count']} CPUs ({m['cpu']}), {report['measured']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _child_main(job: dict) -> dict:
    from .families import FAMILIES

    return FAMILIES[job["family"]].bench.child(job, art.load(job["path"], check_hashes=False))


if __name__ == "__main__":  # child process entry: one job
    print(json.dumps(_child_main(json.loads(sys.argv[1]))))
