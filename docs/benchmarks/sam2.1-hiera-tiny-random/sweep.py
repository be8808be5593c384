"""Compact points_per_batch sweep and post-processing share (written for a loaded 2-core machine).
Per artifact: an 8x8 grid (64 prompts) through segment_everything at each points_per_batch, interleaved, min of 2;
then a 16x16 grid at the best size and at 64; then every mask kept (IoU and stability tests off) on the 8x8 grid:
the low-res path vs the exact path."""
import json, os, sys, time
import numpy as np
from onnxforge.runtime.sam import open_predictor

out = {"load_before": os.getloadavg()}
for spec in sys.argv[1:]:
    name, path, w, h = spec.split(":")
    w, h = int(w), int(h)
    p = open_predictor(path, threads=2)
    p.set_image(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    dec = p.decode
    acc = [0.0]
    def timed(*a, **k):
        t = time.perf_counter(); r = dec(*a, **k); acc[0] += time.perf_counter() - t; return r
    p.decode = timed
    p.segment_everything(points_per_side=2, points_per_batch=4)
    sizes = (1, 8, 16, 32, 64)
    times = {b: [] for b in sizes}
    for rep in range(2):
        for b in (sizes if rep == 0 else sizes[::-1]):
            t = time.perf_counter(); p.segment_everything(points_per_side=8, points_per_batch=b)
            times[b].append(time.perf_counter() - t)
    best = min(sizes, key=lambda b: min(times[b]))
    r = {"picture": f"{w}x{h}", "input_size": p.image_size,
         "everything8_s_by_points_per_batch": {b: round(min(v), 3) for b, v in times.items()}, "best": best}
    print(name, r, flush=True)
    for b in sorted({best, 64}):
        acc[0] = 0.0
        t = time.perf_counter(); c = p.segment_everything(points_per_side=16, points_per_batch=b)
        r[f"everything16_s_ppb{b}"] = round(time.perf_counter() - t, 3)
        r[f"everything16_decoder_s_ppb{b}"] = round(acc[0], 3)
        r[f"everything16_candidates_ppb{b}"] = len(c)
    print(name, r, flush=True)
    for label, kw in (("low_res", {}), ("exact", {"exact": True})):
        acc[0] = 0.0
        t = time.perf_counter()
        c = p.segment_everything(points_per_side=8, points_per_batch=best, pred_iou_threshold=0.0, stability_threshold=0.0, **kw)
        r[f"everything8_all_masks_{label}_s"] = round(time.perf_counter() - t, 3)
        r[f"everything8_all_masks_{label}_decoder_s"] = round(acc[0], 3)
        r[f"everything8_all_masks_{label}_candidates"] = len(c)
    print(name, r, flush=True)
    out[name] = r
    out["load_after_" + name] = os.getloadavg()
    json.dump(out, open("/tmp/samspeed/sweep2.json", "w"), indent=1)
