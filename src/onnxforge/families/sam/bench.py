"""SAM benchmark jobs for the shared harness (onnxforge/bench.py): one job per variant.

Encoder latency at the model's input size (a new picture each run, so the embedding cache never hits),
decoder latency per point and per box prompt (decoder alone, and the whole predict), "segment everything"
on a grid, peak RSS. Runtime only (numpy + onnxruntime), like a user's program.
"""

from __future__ import annotations

import time

import numpy as np

DECODER_TARGET_MS = 50.0
INT8_ENCODER_SPEEDUP_TARGET = 1.5


def _size(text) -> list[int]:
    w, _, h = str(text).partition("x")
    if not (w.isdigit() and h.isdigit()):
        raise ValueError(f"--image {text!r}: expected WIDTHxHEIGHT, e.g. 1024x768")
    return [int(w), int(h)]


SETTINGS = {
    "runs": (5, int, "timed encoder runs"),
    "warmup": (1, int, "untimed runs first"),
    "prompts": (20, int, "timed point and box prompts each"),
    "points_per_side": (16, int, "everything-mode grid"),
    "image": ("1024x768", str, "picture size WIDTHxHEIGHT"),
    "arena": (False, bool, "encoder with onnxruntime's memory arena (as segment --arena)"),
}
HEADERS = ("input px", "encoder ms (mean / p95)", "decoder ms point / box", "predict ms point / box",
           "everything s (candidates)", "peak RSS MiB", "encoder MiB", "decoder MiB")
PANELS = (("encoder ms (mean)", lambda r: r["encoder_ms"]["mean"]),
          ("decoder ms per point", lambda r: r["decoder_point_ms"]["mean"]),
          ("everything s", lambda r: r["everything_s"]),
          ("peak RSS MiB", lambda r: r["peak_rss_mib"]))


def check(s: dict) -> None:
    _size(s["image"])
    if s["runs"] < 1 or s["warmup"] < 0 or s["prompts"] < 1 or s["points_per_side"] < 1:
        raise ValueError("runs, prompts and points per side must be >= 1, warmup >= 0")


def jobs(manifest: dict, s: dict) -> list[dict]:
    return [{"what": "predictor", **s, "image": _size(s["image"])}]


def child(job: dict, a) -> dict:
    from ...bench import peak_rss_mib, stats
    from ...runtime.sam import SamPredictor

    t0 = time.perf_counter()
    predictor = SamPredictor(a, threads=job["threads"], low_memory=not job["arena"])
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mib()
    width, height = job["image"]
    encoder = []
    for i in range(job["warmup"] + job["runs"]):
        picture = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        t = time.perf_counter()
        predictor.set_image(picture)
        if i >= job["warmup"]:
            encoder.append((time.perf_counter() - t) * 1e3)
    rng = np.random.default_rng(0)
    timings: dict[str, list[float]] = {"decoder_point": [], "decoder_box": [], "predict_point": [], "predict_box": []}
    for i in range(job["warmup"] + job["prompts"]):
        x, y = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        box = (x - 0.1 * width, y - 0.1 * height, x + 0.1 * width, y + 0.1 * height)
        for kind, kwargs in (("point", {"points": [(x, y)]}), ("box", {"box": box})):
            coords, codes = predictor.prompt_tokens(**kwargs)
            t = time.perf_counter()
            predictor.decode(coords[None], codes[None])
            dec = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            predictor.predict(**kwargs)
            full = (time.perf_counter() - t) * 1e3
            if i >= job["warmup"]:
                timings[f"decoder_{kind}"].append(dec)
                timings[f"predict_{kind}"].append(full)
    t = time.perf_counter()
    candidates = predictor.segment_everything(points_per_side=job["points_per_side"])
    everything_s = time.perf_counter() - t
    return {"input_size": predictor.image_size, "load_s": round(load_s, 3), "encoder_ms": stats(encoder),
            **{f"{k}_ms": stats(v) for k, v in timings.items()}, "everything_s": round(everything_s, 3),
            "everything_candidates": len(candidates), "encoder_runs": predictor.encoder_runs,
            "peak_rss_mib_after_load": rss_loaded, "peak_rss_mib": peak_rss_mib()}


def collect(manifest: dict, done: list) -> dict:
    (_, r), = done
    mib = {name: round(sum(f["bytes"] for f in c["files"]) / 2**20, 2) for name, c in manifest["components"].items()}
    return {**r, "encoder_mib": mib["encoder"], "decoder_mib": mib["decoder"]}


def ratios(results: dict) -> dict:
    out: dict = {}
    if "fp32" in results and "int8" in results:
        f, q = results["fp32"], results["int8"]
        out["int8_encoder_speedup"] = round(f["encoder_ms"]["mean"] / q["encoder_ms"]["mean"], 3)
        out["int8_encoder_size_fraction"] = round(q["encoder_mib"] / f["encoder_mib"], 4)
        out["int8_peak_rss_fraction"] = round(q["peak_rss_mib"] / f["peak_rss_mib"], 4)
        out["int8_everything_speedup"] = round(f["everything_s"] / q["everything_s"], 3)
        out[f"target: int8 encoder >= {INT8_ENCODER_SPEEDUP_TARGET:g}x fp32"] = (
            "met" if out["int8_encoder_speedup"] >= INT8_ENCODER_SPEEDUP_TARGET else "NOT met")
    for name, r in results.items():
        worst = max(r["decoder_point_ms"]["mean"], r["decoder_box_ms"]["mean"])
        out[f"target: {name} decoder <= {DECODER_TARGET_MS:g} ms per prompt"] = f"{worst:.1f} ms: " + (
            "met" if worst <= DECODER_TARGET_MS else "NOT met")
    return out


def rows(name: str, r: dict) -> list[list[str]]:
    return [[str(r["input_size"]), f"{r['encoder_ms']['mean']:.1f} / {r['encoder_ms']['p95']:.1f}",
             f"{r['decoder_point_ms']['mean']:.1f} / {r['decoder_box_ms']['mean']:.1f}",
             f"{r['predict_point_ms']['mean']:.1f} / {r['predict_box_ms']['mean']:.1f}",
             f"{r['everything_s']:.2f} ({r['everything_candidates']})", f"{r['peak_rss_mib']:.0f}",
             f"{r['encoder_mib']:.1f}", f"{r['decoder_mib']:.1f}"]]


def summary(r: dict) -> dict:
    return {k: r[k] for k in ("encoder_ms", "decoder_point_ms", "decoder_box_ms", "everything_s", "peak_rss_mib", "load_s")}


def describe(b: dict) -> str:
    e = b["encoder_ms"]
    return (f"encoder {e['mean']:.1f} ms mean (p50 {e['p50']:.1f}, p95 {e['p95']:.1f}, n {e['n']}), decoder "
            f"{b['decoder_point_ms']['mean']:.1f} ms per point, everything {b['everything_s']:.2f} s, "
            f"peak RSS {b['peak_rss_mib']} MiB")


# ---- budget checks (onnxforge/budgets.py): the figures a recipe's budgets may name, and a short fixed workload ----

FIGURES = {
    "encoder_ms": "median ms of the image encoder (a new picture each run)",
    "decoder_ms": "median ms of the mask decoder alone, per point prompt",
}
CHECK = {"runs": 3, "warmup": 1, "prompts": 5, "points_per_side": 2, "image": "320x240", "arena": False}


def check_jobs(manifest: dict, figures: set[str]) -> list[dict]:
    return jobs(manifest, CHECK) if figures else []


def check_figures(manifest: dict, done: list) -> dict:
    if not done:  # only size budgets: nothing was run
        return {}
    (_, r), = done
    return {"encoder_ms": r["encoder_ms"]["p50"], "decoder_ms": r["decoder_point_ms"]["p50"]}
