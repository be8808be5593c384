"""Stable Diffusion benchmark jobs for the shared harness (onnxforge/bench.py).

Per variant, each in its own child process, runtime only (numpy + onnxruntime), like a user's program:
  text_encoder   one call at batch 2 x 77 tokens (prompt + negative prompt)
  unet           one denoising step at each of `sizes` (square, px), at the UNet's batch: 2 with guidance
                 (classifier-free), 1 for a one-pass (LCM) artifact
  vae_decoder    latents -> picture at each size (batch 1)
  vae_encoder    picture -> latents at each size (batch 1)
  image          a whole picture at each of `image_sizes` (or `image_size`, or the manifest's) with
                 `image_steps` steps (default: the manifest's, e.g. 25 for classic, 4 for LCM; 0: skip),
                 seconds per stage (text encoder, UNet steps, VAE decoder)
Each: load time, `runs` timed calls after `warmup` untimed ones, peak RSS of the process. Inputs come from
the submodule table (submodules.py), shapes from the manifest's runtime block. Ratios compare every
variant with `fp32`, or with the first variant named when there is none (e.g. a classic int8 artifact
against fast-path ones).
"""

from __future__ import annotations

import time

import numpy as np

from .submodules import SUBMODULES


def _sizes(text) -> list[int]:
    try:
        sizes = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--sizes {text!r}: expected comma-separated pixel sizes, e.g. 256,512") from None
    return sizes


SETTINGS = {
    "sizes": ("256,512", str, "square picture sizes for the per-submodule runs"),
    "runs": (3, int, "timed calls per submodule and size"),
    "warmup": (1, int, "untimed calls first"),
    "image_size": (None, int, "whole-picture size in px (default: the manifest's)"),
    "image_sizes": (None, str, "whole-picture sizes in px, comma-separated (overrides image_size)"),
    "image_steps": (None, int, "whole-picture steps, 0 = skip (default: the manifest's)"),
    "image_runs": (1, int, "whole pictures timed"),
    "low_memory": (False, bool, "draw the whole picture one submodule at a time (its load time counts)"),
}
HEADERS = ("submodule", "size", "mode", "ms mean", "p50", "p95", "peak RSS MiB", "load s", "MiB on disk")
PANELS = (("UNet step ms (largest size; batch 2 with CFG, 1 one-pass)", lambda r: _largest(r, "unet")),
          ("VAE decoder ms (largest size)", lambda r: _largest(r, "vae_decoder")),
          ("whole picture s", lambda r: r["image"]["image_ms"]["mean"] / 1e3 if r["image"] else None),
          ("MiB on disk", lambda r: r["size_mib"]))


def _largest(r: dict, sub: str):
    by_size = r["submodules"].get(sub, {})
    return by_size[max(by_size, key=int)]["ms"]["mean"] if by_size else None


def check(s: dict) -> None:
    sizes = _sizes(s["sizes"])
    image_sizes = _sizes(s["image_sizes"]) if s["image_sizes"] else [8]
    if s["runs"] < 1 or s["warmup"] < 0 or (s["image_steps"] or 0) < 0 or s["image_runs"] < 1 or not sizes \
            or min(sizes + image_sizes) < 8:
        raise ValueError("runs and image runs must be >= 1, warmup and image steps >= 0, sizes >= 8 px")


def jobs(manifest: dict, s: dict) -> list[dict]:
    base = {"runs": s["runs"], "warmup": s["warmup"]}
    out = [{**base, "what": "text_encoder", "size": 0}]
    out += [{**base, "what": sub, "size": size} for sub in ("unet", "vae_decoder", "vae_encoder") for size in _sizes(s["sizes"])]
    steps = manifest["runtime"]["steps"] if s["image_steps"] is None else s["image_steps"]
    if steps > 0:
        sizes = _sizes(s["image_sizes"]) if s["image_sizes"] else [s["image_size"] or manifest["runtime"]["width"]]
        out += [{"what": "image", "size": size, "steps": steps, "runs": s["image_runs"], "warmup": 0,
                 "low_memory": s["low_memory"]} for size in sizes]
    return out


def _inputs(name: str, rt: dict, size: int, batch: int | None = None) -> dict:
    """Bench inputs: random latents/pictures of the size, and a 20-token prompt for the text encoder; batch
    None: 2 for the submodules classifier-free guidance doubles, else 1."""
    rng = np.random.default_rng(0)
    n = rt["max_length"]
    ids = np.full((2, n), rt["pad_id"], np.int64)
    ids[:, 0], ids[:, 1:20], ids[:, 20] = rt["bos_id"], rng.integers(0, 300, (2, 19)), rt["eos_id"]
    if batch is None:  # the check names its batch (step_batch); the bench runs the artifact's own
        batch = 2 if SUBMODULES[name].cfg_batch else 1
        if name == "unet":
            batch = int(rt.get("unet_batch", 2))  # 1: a one-pass (LCM) UNet, which runs without a negative pass
    return SUBMODULES[name].example(rt, batch, size, size, ids, rng)


def child(job: dict, a) -> dict:
    from ...bench import peak_rss_mib, stats

    if job["what"] == "image":
        from ...runtime.sd import StableDiffusion

        t0 = time.perf_counter()
        sd = StableDiffusion(a, threads=job["threads"], low_memory=job["low_memory"])
        load_s = time.perf_counter() - t0
        totals, per_step, stages = [], [], {"text_encoder_s": [], "unet_s": [], "vae_decoder_s": []}
        for i in range(job["warmup"] + job["runs"]):
            g = sd.generate("a lighthouse on a rocky cliff at dusk, oil painting", steps=job["steps"], seed=i,
                            width=job["size"], height=job["size"])
            if i >= job["warmup"]:
                t = g.timings
                totals.append(t["total_s"] * 1e3)
                per_step.append(t["unet_s_per_step"] * 1e3)
                stages["text_encoder_s"].append(t["text_encoder_s"])
                stages["unet_s"].append(t["unet_s_per_step"] * t["unet_steps"])
                stages["vae_decoder_s"].append(t["vae_decoder_s"])
        # Seconds per stage (mean over runs); in low-memory mode each includes loading its session.
        return {"load_s": round(load_s, 3), "image_ms": stats(totals), "unet_step_ms_in_image": stats(per_step),
                "stage_s": {k: round(float(np.mean(v)), 3) for k, v in stages.items()},
                "unet_calls": g.timings["unet_steps"], "unet_batch": int(sd.runtime.get("unet_batch", 2)),
                "scheduler": g.settings["scheduler"], "guidance_scale": g.settings["guidance_scale"],
                "vae": sd.runtime.get("vae", "sd"), "low_memory": job["low_memory"], "peak_rss_mib": peak_rss_mib()}
    name = job["what"]
    t0 = time.perf_counter()
    session = a.session(name, threads=job["threads"])
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mib()
    inputs = _inputs(name, a.runtime, job["size"], job.get("batch"))
    times = []
    for i in range(job["warmup"] + job["runs"]):
        t = time.perf_counter()
        session.run(None, inputs)
        if i >= job["warmup"]:
            times.append((time.perf_counter() - t) * 1e3)
    return {"load_s": round(load_s, 3), "ms": stats(times), "peak_rss_mib_after_load": rss_loaded,
            "peak_rss_mib": peak_rss_mib()}


def collect(manifest: dict, done: list) -> dict:
    quant = next((s for s in manifest["stages"] if s["stage"] == "quantize"), None)
    mib = {n: round(sum(f["bytes"] for f in c["files"]) / 2**20, 2) for n, c in manifest["components"].items()}
    out = {"component_mib": mib, "size_mib": round(sum(mib.values()), 2), "submodules": {}, "image": None,
           "images": {}, "modes": {n: quant["submodules"][n]["mode"] if quant else "float" for n in manifest["components"]}}
    for job, r in done:
        if job["what"] == "image":
            out["images"][str(job["size"])] = {"size": job["size"], "steps": job["steps"], **r}
            out["image"] = out["images"][max(out["images"], key=int)]  # the largest picture: chart and summary
        else:
            out["submodules"].setdefault(job["what"], {})[str(job["size"]) if job["size"] else "77 tokens"] = r
    return out


def ratios(results: dict) -> dict:
    """Speed-up and size fraction of each variant against fp32 (measured in this run)."""
    out: dict = {}
    if not results:
        return out
    ref_name = "fp32" if "fp32" in results else next(iter(results))
    ref = results[ref_name]
    for name, r in results.items():
        if name == ref_name:
            continue
        entry = {"size_fraction": round(r["size_mib"] / ref["size_mib"], 4)}
        for sub, by_size in r["submodules"].items():
            for size, v in by_size.items():
                base = ref["submodules"].get(sub, {}).get(size)
                if base:
                    entry[f"{sub}@{size} speedup"] = round(base["ms"]["mean"] / v["ms"]["mean"], 3)
        if r["image"] and ref["image"]:
            entry["image speedup"] = round(ref["image"]["image_ms"]["mean"] / r["image"]["image_ms"]["mean"], 3)
        for size, im in r.get("images", {}).items():
            base = ref.get("images", {}).get(size)
            if base and len(r["images"]) > 1:
                entry[f"image@{size} speedup"] = round(base["image_ms"]["mean"] / im["image_ms"]["mean"], 3)
        entry["vs"] = ref_name
        out[name] = entry
    return out


def rows(name: str, r: dict) -> list[list[str]]:
    out = []
    for sub, by_size in r["submodules"].items():
        for size, v in by_size.items():
            out.append([sub, size, r["modes"].get(sub, "?"), f"{v['ms']['mean']:.1f}", f"{v['ms']['p50']:.1f}",
                        f"{v['ms']['p95']:.1f}", f"{v['peak_rss_mib']:.0f}", f"{v['load_s']:.2f}",
                        f"{r['component_mib'].get(sub, 0):.1f}"])
    for im in (r.get("images") or ({"_": r["image"]} if r["image"] else {})).values():
        st = im.get("stage_s")
        what = f"whole image ({im['steps']} steps" + (f", batch {im['unet_batch']}, {im.get('vae', 'sd')} VAE" if st else "") + ")"
        mode = ("low-memory" if im["low_memory"] else "") + (
            f" text {st['text_encoder_s']:.2f} s, UNet {st['unet_s']:.2f} s, VAE {st['vae_decoder_s']:.2f} s" if st else "")
        out.append([what, str(im["size"]), mode.strip(), f"{im['image_ms']['mean']:.0f}", f"{im['image_ms']['p50']:.0f}",
                    f"{im['image_ms']['p95']:.0f}", f"{im['peak_rss_mib']:.0f}", f"{im['load_s']:.2f}",
                    f"{r['size_mib']:.1f}"])
    return out


def summary(r: dict) -> dict:
    return {k: r[k] for k in ("submodules", "image", "images", "size_mib")}


def describe(b: dict) -> str:
    unet = b["submodules"].get("unet", {})
    parts = [f"UNet step {v['ms']['mean']:.1f} ms at {s} px" for s, v in unet.items()]
    if b.get("image"):
        im = b["image"]
        parts.append(f"whole {im['size']} px picture ({im['steps']} steps) {im['image_ms']['mean'] / 1e3:.1f} s, "
                     f"peak RSS {im['peak_rss_mib']:.0f} MiB")
    return "; ".join(parts) or "no figures"


# ---- budget checks (onnxforge/budgets.py): the figures a recipe's budgets may name, and a short fixed workload ----

FIGURES = {
    "unet_step_ms": "median ms of one denoising step's UNet call at the batch the variant runs per step (unet_batch)",
    "unet_batch": "latent images the UNet computes per denoising step of one picture: the graph's fixed batch, "
                  "else the manifest's runtime unet_batch (one-pass artifacts), else 2 under classifier-free "
                  "guidance (the manifest's guidance_scale > 1), else 1",
    "text_encoder_ms": "median ms of the text encoder at the batch guidance needs",
    "vae_decoder_ms": "median ms of the VAE decoder, one picture",
}
# peak_rss_mib of a standard run: a whole picture of `image_steps` steps, everything loaded at once.
# Medians of 5 calls: a 2-core machine shared with other jobs has spikes of 2x within a second.
CHECK = {"size": 256, "runs": 5, "warmup": 1, "image_steps": 2}


def step_batch(manifest: dict) -> int:
    """Latent images per UNet call per denoising step, as the pipeline runs this artifact (see FIGURES)."""
    sample = next(i for i in manifest["components"]["unet"]["inputs"] if i["name"] == "sample")
    if isinstance(sample["shape"][0], int):
        return sample["shape"][0]
    if "unet_batch" in manifest["runtime"]:  # a one-pass (LCM) artifact says so (issue 12)
        return int(manifest["runtime"]["unet_batch"])
    return 2 if manifest["runtime"]["guidance_scale"] > 1 else 1


def check_jobs(manifest: dict, figures: set[str]) -> list[dict]:
    base = {"runs": CHECK["runs"], "warmup": CHECK["warmup"], "size": CHECK["size"]}
    guided = 2 if manifest["runtime"]["guidance_scale"] > 1 else 1
    out = []
    if "unet_step_ms" in figures:
        out.append({**base, "what": "unet", "batch": step_batch(manifest)})
    if "text_encoder_ms" in figures:
        out.append({**base, "what": "text_encoder", "batch": guided, "size": 0})
    if "vae_decoder_ms" in figures:
        out.append({**base, "what": "vae_decoder", "batch": 1})
    if "peak_rss_mib" in figures:
        out.append({"what": "image", "size": CHECK["size"], "steps": CHECK["image_steps"], "runs": 1, "warmup": 0,
                    "low_memory": False})
    return out


def check_figures(manifest: dict, done: list) -> dict:
    out = {"unet_batch": step_batch(manifest)}
    for job, r in done:
        if job["what"] != "image":
            out[f"{'unet_step' if job['what'] == 'unet' else job['what']}_ms"] = r["ms"]["p50"]
    return out
