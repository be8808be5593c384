"""SAM and SAM 2 benchmark jobs for the shared harness (onnxforge/bench.py): one job per variant and picture.

Encoder latency at the model's input size (a new picture each run, so the embedding cache never hits),
decoder latency per point and per box prompt (decoder alone, and the whole predict) and per batch of
`batch` point prompts in one call, "segment everything" on each grid (seconds after the encoder), peak
RSS. Runtime only (numpy + onnxruntime), like a user's program. Both families share this module, so
ViT-B and SAM 2.1 variants compare in one run.
"""

from __future__ import annotations

import time

import numpy as np

DECODER_TARGET_MS = 50.0
INT8_ENCODER_SPEEDUP_TARGET = 1.5
EVERYTHING_16_TARGET_S, EVERYTHING_32_TARGET_S = 1.0, 3.0  # issue 13: seconds after the encoder


def _size(text) -> list[int]:
    w, _, h = str(text).partition("x")
    if not (w.isdigit() and h.isdigit()):
        raise ValueError(f"--image {text!r}: expected WIDTHxHEIGHT, e.g. 1024x768")
    return [int(w), int(h)]


def _sizes(text) -> list[list[int]]:
    """One picture size or several, comma-separated: 1024x768,512x512."""
    return [_size(t.strip()) for t in str(text).split(",")]


def _grids(text) -> list[int]:
    """One everything grid or several, comma-separated: 16,32."""
    parts = [t.strip() for t in str(text).split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"--points-per-side {text!r}: expected grid sizes like 16 or 16,32")
    return [int(p) for p in parts]


SETTINGS = {
    "runs": (5, int, "timed encoder runs"),
    "warmup": (1, int, "untimed runs first"),
    "prompts": (20, int, "timed point and box prompts each"),
    "points_per_side": ("16", str, "everything-mode grid(s), e.g. 16,32 (the first is the headline figure)"),
    "batch": (64, int, "point prompts per decoder call in the batched-decoder timing"),
    "points_per_batch": (0, int, "segment everything: grid points per decoder call (0: the artifact's default)"),
    "image": ("1024x768", str, "picture size(s) WIDTHxHEIGHT, e.g. 1024x768,512x512 (the first is the headline)"),
    "arena": (False, bool, "encoder with onnxruntime's memory arena (as segment --arena)"),
}
HEADERS = ("picture", "input px", "encoder ms (mean / p95)", "decoder ms point / box", "decoder ms per batch (per prompt)",
           "predict ms point / box", "everything s per grid (candidates; decoder s)", "peak RSS MiB", "encoder MiB", "decoder MiB")
PANELS = (("encoder ms (mean)", lambda r: r["encoder_ms"]["mean"]),
          ("decoder ms per point", lambda r: r["decoder_point_ms"]["mean"]),
          ("everything s", lambda r: r["everything_s"]),
          ("peak RSS MiB", lambda r: r["peak_rss_mib"]))


def check(s: dict) -> None:
    _sizes(s["image"])
    grids = _grids(s["points_per_side"])
    if s["runs"] < 1 or s["warmup"] < 0 or s["prompts"] < 1 or min(grids) < 1 or s["batch"] < 1:
        raise ValueError("runs, prompts, batch and points per side must be >= 1, warmup >= 0")
    if s["points_per_batch"] < 0:
        raise ValueError("points per batch must be >= 1, or 0 for the artifact's default")


def jobs(manifest: dict, s: dict) -> list[dict]:
    return [{"what": "predictor", **s, "image": size, "points_per_side": _grids(s["points_per_side"])}
            for size in _sizes(s["image"])]


def child(job: dict, a) -> dict:
    from ...bench import peak_rss_mib, stats
    from ...runtime.sam import open_predictor

    t0 = time.perf_counter()
    predictor = open_predictor(a, threads=job["threads"], low_memory=not job["arena"])
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
    # A batch of point prompts in one decoder call (what segment everything sends).
    n = job["batch"]
    pts = np.stack([rng.uniform(0.05, 0.95, n) * width, rng.uniform(0.05, 0.95, n) * height], axis=1)
    tokens = [predictor.prompt_tokens(points=[p]) for p in pts]
    coords, codes = np.stack([c for c, _ in tokens]), np.stack([k for _, k in tokens])
    batch = []
    for i in range(job["warmup"] + max(3, job["prompts"] // 4)):
        t = time.perf_counter()
        predictor.decode(coords, codes)
        if i >= job["warmup"]:
            batch.append((time.perf_counter() - t) * 1e3)
    # Segment everything, with the decoder's share of the time (the rest is numpy filtering and resizing).
    decode, decoder_s = predictor.decode, [0.0]

    def timed_decode(*args, **kwargs):
        t = time.perf_counter()
        out = decode(*args, **kwargs)
        decoder_s[0] += time.perf_counter() - t
        return out

    predictor.decode = timed_decode
    everything = {}
    for grid in job["points_per_side"]:
        decoder_s[0] = 0.0
        t = time.perf_counter()
        candidates = predictor.segment_everything(points_per_side=grid, points_per_batch=job["points_per_batch"] or None)
        everything[str(grid)] = {"s": round(time.perf_counter() - t, 3), "candidates": len(candidates),
                                 "decoder_s": round(decoder_s[0], 3)}
    predictor.decode = decode
    first = everything[str(job["points_per_side"][0])]
    return {"picture": f"{width}x{height}", "input_size": predictor.image_size, "load_s": round(load_s, 3),
            "encoder_ms": stats(encoder), **{f"{k}_ms": stats(v) for k, v in timings.items()},
            "decoder_batch_ms": stats(batch), "decoder_batch_size": n,
            "decoder_batch_per_prompt_ms": round(stats(batch)["mean"] / n, 3),
            "everything_s": first["s"], "everything_candidates": first["candidates"], "everything": everything,
            "everything_points_per_batch": job["points_per_batch"] or predictor.runtime["everything"]["points_per_batch"],
            "encoder_runs": predictor.encoder_runs, "peak_rss_mib_after_load": rss_loaded,
            "peak_rss_mib": peak_rss_mib()}


def collect(manifest: dict, done: list) -> dict:
    """The first picture's figures at the top (the headline), every picture's under by_picture."""
    mib = {name: round(sum(f["bytes"] for f in c["files"]) / 2**20, 2) for name, c in manifest["components"].items()}
    sizes = {"encoder_mib": mib["encoder"], "decoder_mib": mib["decoder"]}
    by_picture = {r["picture"]: {**r, **sizes} for _, r in done}
    return {**done[0][1], **sizes, "by_picture": by_picture}


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
    # Every variant's encoder against the first one listed (e.g. ViT-B fp32 as the baseline), per picture.
    base_name = next(iter(results))
    base = results[base_name]
    for name, r in list(results.items())[1:]:
        for pic, p in r.get("by_picture", {}).items():
            b = base.get("by_picture", {}).get(pic)
            if b:
                out[f"{name} encoder speedup vs {base_name} at {pic}"] = round(b["encoder_ms"]["mean"] / p["encoder_ms"]["mean"], 3)
    for name, r in results.items():
        for pic, p in r.get("by_picture", {}).items():
            for grid, limit in (("16", EVERYTHING_16_TARGET_S), ("32", EVERYTHING_32_TARGET_S)):
                e = p.get("everything", {}).get(grid)
                if e:
                    out[f"target: {name} everything {grid}x{grid} <= {limit:g} s at {pic}"] = (
                        f"{e['s']:.2f} s: " + ("met" if e["s"] <= limit else "NOT met"))
    for name, r in results.items():
        worst = max(r["decoder_point_ms"]["mean"], r["decoder_box_ms"]["mean"])
        out[f"target: {name} decoder <= {DECODER_TARGET_MS:g} ms per prompt"] = f"{worst:.1f} ms: " + (
            "met" if worst <= DECODER_TARGET_MS else "NOT met")
    return out


def rows(name: str, r: dict) -> list[list[str]]:
    out = []
    for p in r.get("by_picture", {r.get("picture", "?"): r}).values():
        every = p.get("everything") or {"?": {"s": p["everything_s"], "candidates": p["everything_candidates"]}}
        batch = (f"{p['decoder_batch_ms']['mean']:.1f} ({p['decoder_batch_per_prompt_ms']:.2f})"
                 if "decoder_batch_ms" in p else "-")
        out.append([p.get("picture", "?"), str(p["input_size"]), f"{p['encoder_ms']['mean']:.1f} / {p['encoder_ms']['p95']:.1f}",
                    f"{p['decoder_point_ms']['mean']:.1f} / {p['decoder_box_ms']['mean']:.1f}", batch,
                    f"{p['predict_point_ms']['mean']:.1f} / {p['predict_box_ms']['mean']:.1f}",
                    ", ".join(f"{g}: {e['s']:.2f} ({e['candidates']}" + (f"; {e['decoder_s']:.2f})" if "decoder_s" in e else ")")
                              for g, e in every.items()),
                    f"{p['peak_rss_mib']:.0f}", f"{p['encoder_mib']:.1f}", f"{p['decoder_mib']:.1f}"])
    return out


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
CHECK = {"runs": 3, "warmup": 1, "prompts": 5, "points_per_side": 2, "batch": 4, "points_per_batch": 0, "image": "320x240",
         "arena": False}


def check_jobs(manifest: dict, figures: set[str]) -> list[dict]:
    return jobs(manifest, CHECK) if figures else []


def check_figures(manifest: dict, done: list) -> dict:
    if not done:  # only size budgets: nothing was run
        return {}
    (_, r), = done
    return {"encoder_ms": r["encoder_ms"]["p50"], "decoder_ms": r["decoder_point_ms"]["p50"]}
