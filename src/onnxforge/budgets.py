"""Artifact budgets: figures a built variant must stay within, declared in its recipe, checked by `doit check`
and `onnxforge check` (and in CI on the tiny recipes).

    budgets:
      kv:
        size_mib: 1.6                              # at most this many MiB on disk
        peak_rss_mib: 260                          # at most this peak RSS in the check's standard run
        ratio: {decode_ms: {of: base, max: 0.5}}   # at most 0.5 x base's figure, measured in the same run
        ceiling:                                   # absolute; only on the machine class it was set on
          decode_ms: {max: 1.5, cpu: "Intel(R) Xeon(R) ...", simd: [avx2, avx512f, avx512_vnni]}

Figures: `size_mib` and `peak_rss_mib` for every family, plus the family's own (its bench module's FIGURES).
Quality floors are not budgets: they stay in each variant's validation (the build fails on them).

The check measures only what the budgets name, with each family's short fixed workload (its bench module's
CHECK settings) run through the shared benchmark harness (one child process per job), repeated and
interleaved across variants (A B A B ...) so a ratio compares runs made moments apart on a noisy machine:
a ratio is the median of the per-repetition ratios, a latency the median, a peak RSS the largest seen.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from .config import Ceiling, Recipe, VariantBudget, variant_names

DEFAULT_REPS = 3


# ---- the check -------------------------------------------------------------------------------------------------


class CheckError(ValueError):
    """The check cannot run (nothing built, a reference missing): one line saying what to do."""


def _dir_mib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 3)


def _float_weight_mib(version: Path, manifest: dict) -> float:
    """Float initializers' bytes, from the graphs' tensor shapes (external data is not read)."""
    import numpy as np
    import onnx

    total = 0
    for comp in manifest["components"].values():
        model = onnx.load(str(version / comp["file"]), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
                total += int(np.prod(t.dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        del model
    return round(total / 2**20, 3)


STATIC = ("size_mib", "float_weight_mib")  # read from the files, not run: exact, measured once


def _built(artifacts: Path, recipe: str, variant: str) -> Path | None:
    from .runtime.artifact import ArtifactError, resolve

    folder = artifacts / recipe / variant
    if not folder.exists():
        return None
    try:
        return resolve(folder)
    except ArtifactError:
        return None


def _same_class(ceiling: Ceiling, machine: dict) -> bool:
    return ceiling.cpu == machine["cpu"] and set(ceiling.simd) == set(machine["simd"])


def check_recipe(recipe: Recipe, artifacts: Path, reps: int = DEFAULT_REPS, threads: int | None = None,
                 out_dir: Path | None = None, variants: list[str] | None = None, echo=print) -> dict:
    """Measure what the recipe's budgets name on its built variants; table + JSON; returns the report.

    `variants` limits the check to these variants' budgets (their references are measured too).
    """
    from .bench import family_of, machine, run_child
    from .runtime import artifact as art

    budgets: dict[str, VariantBudget] = dict(getattr(recipe.body, "budgets", None) or {})
    if variants is not None:
        budgets = {v: b for v, b in budgets.items() if v in variants}
    if not budgets:
        raise CheckError(f"{recipe.name}: no budgets to check (add a `budgets:` section to {recipe.path})")
    build_cmd = f"doit build recipes={recipe.name}"
    built = {v: _built(artifacts, recipe.name, v) for v in recipe_variants(recipe)}
    if not any(built.values()):
        raise CheckError(f"nothing of {recipe.name} is built under {artifacts}: run `{build_cmd}` first")
    for v, b in budgets.items():
        if built[v] is None:
            raise CheckError(f"{recipe.name}/{v} has budgets but is not built under {artifacts}: run `{build_cmd}`")
        for fig, r in b.ratio.items():
            if "/" in r.of:  # another recipe's variant
                built.setdefault(r.of, _built(artifacts, *r.of.split("/", 1)))
            if built[r.of] is None:
                other = r.of.split("/", 1)[0] if "/" in r.of else recipe.name
                raise CheckError(f"{recipe.name}/{v}: budget {fig} is a ratio to {r.of}, which is not built under "
                                 f"{artifacts}: run `doit build recipes={other}`")

    # What each measured variant needs: its own figures, plus the figures others compare to it; a ceiling set
    # on another machine class is skipped, so it measures nothing.
    mach = machine(threads)
    needs: dict[str, set[str]] = {}
    for v, b in budgets.items():
        skipped = {f for f, c in b.ceiling.items() if not _same_class(c, mach)} - set(b.ratio) - {
            f for f in ("size_mib", "peak_rss_mib") if getattr(b, f) is not None}
        needs.setdefault(v, set()).update(b.figures() - skipped)
        for fig, r in b.ratio.items():
            needs.setdefault(r.of, set()).add(fig)
    loaded = {v: art.load(built[v], check_hashes=False) for v in needs}
    families = {family_of(a.manifest, a.dir).name: family_of(a.manifest, a.dir) for a in loaded.values()}
    if len(families) != 1:
        raise CheckError(f"{recipe.name}: a ratio compares artifacts of one family (got {', '.join(sorted(families))})")
    fam = next(iter(families.values()))
    bench = fam.bench
    jobs = {v: [{**job, "family": fam.name, "path": str(a.dir), "threads": threads}
                for job in bench.check_jobs(a.manifest, needs[v] - set(STATIC))]
            for v, a in loaded.items()}
    n_jobs = sum(len(j) for j in jobs.values()) * reps
    echo(f"check {recipe.name}: {', '.join(needs)}; {n_jobs} jobs ({reps} interleaved repetitions)")

    # A B A B ...: every repetition measures each variant once, so a ratio pairs runs made moments apart.
    per_rep: dict[str, list[dict]] = {v: [] for v in needs}
    for _ in range(reps):
        for v in needs:
            try:
                done = [(job, run_child(job)) for job in jobs[v]]
            except RuntimeError as exc:  # the workload itself failed on this artifact: one line, exit non-zero
                raise CheckError(f"{recipe.name}/{v}: {exc}") from None
            figures = bench.check_figures(loaded[v].manifest, done)
            rss = [r["peak_rss_mib"] for _, r in done if "peak_rss_mib" in r]
            if rss:
                figures["peak_rss_mib"] = max(rss)
            per_rep[v].append(figures)

    def measured(v: str, fig: str) -> float:
        if fig == "size_mib":
            return _dir_mib(built[v])
        if fig == "float_weight_mib":
            return _float_weight_mib(built[v], loaded[v].manifest)
        values = [rep[fig] for rep in per_rep[v]]
        return max(values) if fig == "peak_rss_mib" else statistics.median(values)

    rows = []
    for v, b in budgets.items():
        where = f"{recipe.name}/{v}"
        for fig in ("size_mib", "peak_rss_mib"):
            limit = getattr(b, fig)
            if limit is not None:
                rows.append(_row(where, fig, f"<= {limit:g}", measured(v, fig), limit))
        for fig, r in b.ratio.items():
            if fig in STATIC:
                ratio = measured(v, fig) / measured(r.of, fig)
            else:
                ratio = statistics.median(a[fig] / ref[fig] for a, ref in zip(per_rep[v], per_rep[r.of]))
            rows.append(_row(where, f"{fig} / {r.of}", f"<= {r.max:g} x", ratio, r.max))
        for fig, c in b.ceiling.items():
            if _same_class(c, mach):
                rows.append(_row(where, fig, f"<= {c.max:g}", measured(v, fig), c.max))
            else:
                rows.append({"artifact": where, "figure": fig, "budget": f"<= {c.max:g}", "measured": None,
                             "margin": None, "verdict": "skipped",
                             "note": f"set on {c.cpu} ({' '.join(c.simd)}); this machine is {mach['cpu']} "
                                     f"({' '.join(mach['simd'])})"})
    report = {"recipe": recipe.name, "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": mach,
              "reps": reps, "workload": getattr(bench, "CHECK", {}),
              "artifacts": {v: str(built[v]) for v in needs},
              "per_repetition": per_rep, "budgets": rows,
              "passed": all(r["verdict"] != "BROKEN" for r in rows)}
    out_dir = out_dir or artifacts / recipe.name / "check"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(report)
    (out_dir / "check.md").write_text(text + "\n")
    echo(text)
    echo(f"saved {out_dir / 'check.json'}")
    return report


def _row(where: str, figure: str, budget: str, value: float, limit: float) -> dict:
    # margin: how far under the budget, as a fraction of it (negative: over).
    return {"artifact": where, "figure": figure, "budget": budget, "measured": round(value, 4),
            "margin": f"{(limit - value) / limit:+.0%}", "verdict": "ok" if value <= limit else "BROKEN"}


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"budgets of {report['recipe']} — {report['reps']} interleaved repetitions; {m['cpu_count']} CPUs "
             f"({m['cpu']}, {' '.join(m['simd'])}), {report['measured']}", "",
             "| artifact | figure | budget | measured | margin | verdict |", "|---|---|---|---|---|---|"]
    for r in report["budgets"]:
        value = "-" if r["measured"] is None else f"{r['measured']:g}"
        verdict = r["verdict"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(f"| {r['artifact']} | {r['figure']} | {r['budget']} | {value} | {r['margin'] or '-'} | {verdict} |")
    return "\n".join(lines)


def broken_lines(report: dict) -> list[str]:
    return [f"{r['artifact']}: {r['figure']} {r['measured']:g} breaks its budget {r['budget']}"
            for r in report["budgets"] if r["verdict"] == "BROKEN"]


def recipe_variants(recipe: Recipe) -> list[str]:
    return variant_names(recipe.body.variants)
