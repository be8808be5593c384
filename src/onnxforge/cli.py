"""`onnxforge`: generate text, segment pictures, inspect artifacts, benchmark variants, build recipes, export
an artifact in another toolkit's folder layout.

Only the `build` command touches the build stack (torch & co.); the others
use the runtime alone, so they work on a machine with the `runtime` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_TEXT_ARTIFACT = "artifacts/gpt2-tiny/kv"
DEFAULT_ARTIFACTS = "artifacts"
DEFAULT_SD_RECIPE = "sd-tiny"


def _output_file(value: str, flag: str = "--out", what: str = "the picture") -> Path:
    """One rule for every file a command writes, checked before any model runs: a PNG name; missing
    folders are created; a place that cannot be written is one line (not a traceback after the work)."""
    import os
    import tempfile

    path = Path(value)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{flag} {value}: {what} is saved as PNG; use a .png name")
    if path.is_dir():
        raise ValueError(f"{flag} {value}: is a folder; give a file name such as {path / 'out.png'}")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {value}: {existing} is a file, not a folder; choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".onnxforge-write-check-"):
            pass  # a real write: os.access says yes to root even where writing fails
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "the file is read-only")
    except OSError as exc:
        raise ValueError(f"{flag} {value}: cannot write there ({exc.strerror}); choose another path") from None
    return path


def _generate(args) -> int:
    from .runtime.text import SamplingSettings, TextGenerator

    gen = TextGenerator(args.artifact, threads=args.threads)
    penalty = gen.repetition_penalty if args.repetition_penalty is None else args.repetition_penalty
    settings = SamplingSettings(max_new_tokens=args.max_tokens, greedy=args.greedy, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, repetition_penalty=penalty,
                                seed=args.seed, stop=tuple(args.stop))
    result = gen.generate(" ".join(args.word), settings, use_template=not args.raw)
    if args.json:
        print(json.dumps({"prompt": result.prompt, "text": result.text, "tokens": len(result.token_ids),
                          "finish_reason": result.finish_reason, "prefill_ms": round(result.prefill_ms, 2),
                          "notes": result.notes, "artifact": str(gen.artifact.dir)}))
    else:
        print(result.text)
    for note in result.notes:
        print(f"onnxforge generate: note: {note}", file=sys.stderr)
    return 0


def _brief(record: dict, limit: int = 240) -> str:
    """`key=value` pairs up to about `limit` characters, cut between pairs, never inside a word or number."""
    parts, used = [], 0
    for key, value in record.items():
        part = f"{key}={json.dumps(value, separators=(',', ':'))}"
        if parts and used + len(part) > limit:
            parts.append(f"... ({len(record) - len(parts)} more: inspect --json)")
            break
        parts.append(part if len(part) <= limit else part[:limit].rsplit(",", 1)[0] + ",...}")
        used += len(part) + 1
    return " ".join(parts)


def _inspect(args) -> int:
    from .runtime import artifact as art

    a = art.load(args.artifact, check_hashes=not args.no_verify)
    if args.json:
        print(json.dumps(a.manifest, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    m = a.manifest
    con = Console()
    info = m["artifact"]
    con.print(f"[bold]{info['recipe']} / {info['variant']}[/] version [cyan]{info['version']}[/] "
              f"({info['bytes_on_disk'] / 2**20:.1f} MiB, built {info['created']})  {a.dir}")
    src = m["source"]
    con.print(f"source: {src.get('kind')} {src.get('repo', '')} {src.get('revision', '')} "
              f"weights sha256 {src.get('weights_sha256', '')[:16]}…  recipe digest {m['recipe']['digest'][:16]}…")
    con.print("toolchain: " + ", ".join(f"{k} {v}" for k, v in m["toolchain"].items()))
    stages = Table(title="stages")
    for col in ("stage", "digest", "parameters and records"):
        stages.add_column(col)
    for s in m["stages"]:
        rest = {k: v for k, v in s.items() if k not in ("stage", "digest")}
        stages.add_row(s["stage"], s["digest"], _brief(rest))
    con.print(stages)
    for name, comp in m["components"].items():
        t = Table(title=f"component {name}: {comp['file']} (opset {comp['opset']})")
        for col in ("io", "name", "dtype", "shape"):
            t.add_column(col)
        for kind in ("inputs", "outputs"):
            for v in comp[kind]:
                t.add_row(kind[:-1], v["name"], v["dtype"], str(v["shape"]))
        con.print(t)
        for f in comp["files"]:
            con.print(f"  {f['file']}: {f['bytes']:,} bytes, sha256 {f['sha256'][:16]}…")
    val = Table(title=f"validation: {'passed' if m['validation'].get('passed') else 'FAILED'}")
    for col in ("check", "value", "limit", "ok"):
        val.add_column(col)
    for c in m["validation"].get("checks", []):
        val.add_row(c["check"], str(c["value"]), str(c["limit"]), "yes" if c["passed"] else "NO")
    con.print(val)
    extra = {k: v for k, v in m["validation"].items() if k not in ("checks", "passed", "greedy_tokens")}
    if extra:
        con.print("validation records: " + json.dumps(extra))
    if m.get("benchmark"):
        from .bench import family_of

        b = m["benchmark"]
        con.print(f"benchmark: {family_of(m, a.dir).bench.describe(b)} (measured {b['measured']} on {b.get('machine', '?')})")
    else:
        con.print("benchmark: not measured (run `onnxforge bench --artifact PATH` or `--recipe NAME`)")
    con.print("runtime: " + json.dumps(m["runtime"]))
    return 0


def _bench_targets(args) -> dict[str, Path]:
    """The artifacts a bench command measures: --artifact NAME=PATH items, or every built variant of --recipe."""
    from .runtime.artifact import resolve

    if args.artifact:
        paths = {}
        for item in args.artifact:
            name, _, path = item.rpartition("=")
            paths[name or Path(path).name] = resolve(path)
        return paths
    recipe_dir = Path(args.artifacts) / args.recipe
    if not recipe_dir.is_dir():
        raise ValueError(f"no built recipe {args.recipe!r} under {args.artifacts}: build it first (`doit build recipes={args.recipe}`)")
    return {d.name: resolve(d) for d in sorted(recipe_dir.iterdir())
            if d.is_dir() and not d.name.startswith(".") and d.name not in ("bench", "check")}


def _add_bench_targets(p: argparse.ArgumentParser) -> None:
    """The options every bench command shares; `_bench_targets` reads them."""
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", help="benchmark every built variant of this recipe")
    what.add_argument("--artifact", action="append", help="NAME=PATH of one artifact (repeatable)")
    p.add_argument("--artifacts", default="artifacts", help="artifacts root (default: artifacts)")


def _bench(args) -> int:
    from .bench import bench_variants
    from .families import FAMILIES

    paths = _bench_targets(args)
    given = {k: getattr(args, k) for f in FAMILIES.values() if f.bench for k in f.bench.SETTINGS}
    out = Path(args.out) if args.out else Path(args.artifacts) / (args.recipe or "adhoc") / "bench" / "manual"
    unknown = sorted(set(args.no_record or ()) - set(paths))
    if unknown:
        raise ValueError(f"--no-record {unknown[0]}: no artifact of that name in this run (names: {', '.join(paths)})")
    bench_variants(paths, out, settings=given, threads=args.threads, update_manifests=set(paths) - set(args.no_record or ()))
    print(f"saved {out / 'bench.json'}, {out / 'bench.md'} and {out / 'bench.png'}; figures recorded in each manifest")
    return 0


def _check(args) -> int:
    """Budgets of the named recipe (or of every default recipe that declares some) on its built variants."""
    from .budgets import broken_lines, check_recipe
    from .config import load_recipe, load_recipes

    recipes_dir, artifacts = Path(args.recipes_dir), Path(args.artifacts)
    if args.recipe:
        recipes = [load_recipe(recipes_dir / f"{args.recipe}.yaml")]
    else:
        recipes = [r for r in load_recipes(recipes_dir).values() if r.body.default and r.body.budgets]
        if not recipes:
            raise ValueError(f"no default recipe in {recipes_dir} declares budgets; name one with --recipe")
    if args.reps < 1:
        raise ValueError(f"--reps {args.reps}: give 1 or more repetitions")
    broken = []
    for recipe in recipes:
        out = Path(args.out) / recipe.name if args.out and len(recipes) > 1 else (Path(args.out) if args.out else None)
        broken += broken_lines(check_recipe(recipe, artifacts, reps=args.reps, threads=args.threads, out_dir=out))
    for line in broken:
        print(f"onnxforge check: budget broken: {line}", file=sys.stderr)
    return 1 if broken else 0


def _add_bench_settings(p: argparse.ArgumentParser) -> None:
    """Every family's benchmark options (an option of another family than the artifacts' is refused)."""
    from .families import FAMILIES

    seen: dict[str, list] = {}
    for fam in FAMILIES.values():
        for key, (default, parse, help_) in (fam.bench.SETTINGS.items() if fam.bench else ()):
            seen.setdefault(key, []).append((fam.name, default, parse, help_))
    for key, uses in seen.items():
        defaults = ", ".join(f"{name} {default}" for name, default, _, _ in uses)
        parse, help_ = uses[0][2], uses[0][3]
        flag = "--" + key.replace("_", "-")
        if parse is bool:
            p.add_argument(flag, action="store_true", default=None, help=f"{help_} ({', '.join(n for n, *_ in uses)})")
        else:
            p.add_argument(flag, type=parse, default=None, help=f"{help_} (default: {defaults})")


def _numbers(text: str, count: int, flag: str, example: str) -> tuple[float, ...]:
    """'x,y' -> (x, y); a mistake is one line that shows the expected form (the demo's parser, with the flag)."""
    from .demo_cli import parse_numbers

    return parse_numbers(text, count, flag, f"{flag} {example}")


class _PromptAction(argparse.Action):
    """--point and --negative share one ordered list, so `--point x,y --negative` can refer to the point before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        prompts = list(getattr(namespace, "prompts", None) or [])
        prompts.append((option_string, values))
        namespace.prompts = prompts


def _segment_points(prompts) -> tuple[list, list]:
    points, labels = [], []
    for flag, value in prompts or []:
        if flag == "--point":
            points.append(_numbers(value, 2, "--point", "120,80"))
            labels.append(1)
        elif value is not None:  # --negative x,y: a point that is not the object
            points.append(_numbers(value, 2, "--negative", "40,60"))
            labels.append(0)
        elif not points or labels[-1] == 0:
            raise ValueError("--negative without x,y marks the --point just before it; give --point x,y first")
        else:
            labels[-1] = 0
    return points, labels


def _draw_prompts(overlay, points, labels, box):
    """Mark the prompts on the overlay: green (object) and red (not the object) dots, the box outline."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(overlay)
    r = max(3, min(overlay.size) // 80)
    for (x, y), label in zip(points, labels):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(40, 220, 60) if label else (230, 40, 40), outline=(255, 255, 255))
    if box is not None:
        draw.rectangle(list(box), outline=(255, 255, 255), width=max(1, r // 2))
    return overlay


def _segment(args) -> int:
    from .runtime import sam_processing as sp
    from .runtime.sam import open_predictor, save_label_png, save_mask_png

    image_path = Path(args.image)
    if not image_path.is_file():
        raise FileNotFoundError(f"{image_path}: image file not found")
    points, labels = _segment_points(args.prompts)
    box = _numbers(args.box, 4, "--box", "10,20,200,180") if args.box is not None else None
    if args.everything and (points or box is not None):
        raise ValueError("--everything finds all objects by itself: leave out --point/--negative/--box")
    if args.pick is not None and not args.everything:
        raise ValueError("--pick N chooses among the numbered candidates of --everything; add --everything")
    if not args.everything and not points and box is None:
        raise ValueError("say what to segment: --point x,y (repeatable, --negative for points off the object), "
                         "--box x0,y0,x1,y1, or --everything")
    if args.pick is not None and args.pick < 1:
        raise ValueError(f"--pick {args.pick}: candidates are numbered from 1")
    out = _output_file(args.out, "--out", "the mask")
    overlay_path = _output_file(args.overlay, "--overlay", "the overlay") if args.overlay else \
        _output_file(str(out.with_name(f"{out.stem}-overlay.png")), "--overlay", "the overlay")

    rgb = sp.load_rgb(image_path)  # decodes and checks the picture (gray/RGBA converted, size limits)
    # A prompt outside the picture is refused before the artifact loads and the encoder runs.
    if points:
        sp.transform_points(points, rgb.shape[:2], rgb.shape[:2])
    if box is not None:
        sp.transform_boxes(box, rgb.shape[:2], rgb.shape[:2])

    artifact = args.artifact
    if artifact is None:  # the fastest validated SAM / SAM 2 variant built (the demo's choice)
        from .runtime.demo import choose_artifact

        artifact = choose_artifact("mask", DEFAULT_ARTIFACTS).dir
    predictor = open_predictor(artifact, threads=args.threads, low_memory=not args.arena)
    predictor.set_image(rgb)
    record: dict = {"image": str(image_path), "artifact": str(predictor.artifact.dir)}
    if args.everything:
        candidates = predictor.segment_everything(points_per_side=args.points_per_side,
                                                  points_per_batch=args.points_per_batch,
                                                  pred_iou_threshold=args.pred_iou_threshold,
                                                  stability_threshold=args.stability_threshold)
        record["candidates"] = [{"number": n, "area": c.area, "score": round(c.score, 4),
                                 "stability": round(c.stability, 4), "box": list(c.bbox)}
                                for n, c in enumerate(candidates, start=1)]
        if args.pick is not None:
            if not candidates:
                raise ValueError(f"--pick {args.pick}: no candidates were found in this image")
            if args.pick > len(candidates):
                raise ValueError(f"--pick {args.pick}: the image has {len(candidates)} candidate(s), numbered 1 to {len(candidates)}")
            chosen = candidates[args.pick - 1]
            save_mask_png(chosen.mask, out)
            predictor.overlay([chosen.mask], labels=False).save(overlay_path)
            record.update(picked=args.pick, mask=str(out), area=chosen.area, score=round(chosen.score, 4))
        else:
            # No choice yet: --out gets a label map (pixel value = candidate number), the overlay shows the numbers.
            save_label_png(candidates, predictor.image.shape[:2], out)
            predictor.overlay(candidates).save(overlay_path)
            record["labels"] = str(out)
    else:
        mask, best, scores = predictor.best_mask(points or None, labels or None, box, multimask=not args.single_mask)
        save_mask_png(mask, out)
        _draw_prompts(predictor.overlay([mask], labels=False), points, labels, box).save(overlay_path)
        record.update(mask=str(out), area=int(mask.sum()), score=round(float(scores[best]), 4),
                      mask_index=best, scores=[round(float(v), 4) for v in scores])
    record["overlay"] = str(overlay_path)
    if args.json:
        print(json.dumps(record))
    elif args.everything:
        print(f"{len(candidates)} candidate object(s) in {image_path} (largest first):")
        for c in record["candidates"]:
            print(f"  {c['number']:3d}: {c['area']} px, score {c['score']:.3f}, stability {c['stability']:.3f}, box {tuple(c['box'])}")
        if args.pick is not None:
            print(f"picked number {args.pick}: mask {out}, overlay {overlay_path}")
        else:
            print(f"numbered overlay {overlay_path}, label map {out}; choose one with --everything --pick N")
    else:
        print(f"mask {out} ({record['area']} px, score {record['score']:.3f}), overlay {overlay_path}")
    return 0


def _size(text: str) -> tuple[int, int]:
    """'512' or '512x384' (width x height) -> (width, height)."""
    w, sep, h = str(text).lower().partition("x")
    if not w.strip().isdigit() or (sep and not h.strip().isdigit()):
        raise ValueError(f"--size {text!r}: expected WIDTHxHEIGHT or one number for a square, e.g. --size 512x384")
    return (int(w), int(h)) if sep else (int(w), int(w))


def _progress_mode(args) -> bool | str:
    """A progress bar on a terminal; one line per stage when stderr goes to a log or a pipe."""
    if args.no_progress or args.json:
        return False
    return True if sys.stderr.isatty() else "lines"


def _imagine(args) -> int:
    import warnings

    from .runtime.sd import StableDiffusion

    from .runtime.demo import default_image_recipe

    # No recipe named: the pocket-world model when one is built, else the fast path (LCM, one-pass guidance),
    # else the classic default.
    recipe = args.recipe or default_image_recipe(args.artifacts) or DEFAULT_SD_RECIPE
    artifact = args.artifact or str(Path(args.artifacts) / recipe / args.variant)
    out = _output_file(args.out)
    width = height = None
    if args.size is not None:
        width, height = _size(args.size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd = StableDiffusion(artifact, threads=args.threads, low_memory=args.low_memory)
        result = sd.generate(" ".join(args.prompt), args.negative, steps=args.steps, guidance_scale=args.guidance,
                             width=width, height=height, seed=args.seed, scheduler=args.scheduler,
                             progress=_progress_mode(args))
    for w in caught:
        if w.category.__module__.startswith("onnxforge"):
            print(f"onnxforge imagine: warning: {w.message}", file=sys.stderr)
    path = result.save(out)
    record = {"image": str(path), **result.settings, "artifact": str(sd.dir), "timings": result.timings,
              "notes": result.notes}
    if args.json:
        print(json.dumps(record))
    else:
        s = result.settings
        calls = result.timings["unet_steps"]
        steps = f"{s['steps']} {s['scheduler']} steps" + (f" = {calls} UNet calls" if calls != s["steps"] else "")
        print(f"saved {path} ({s['width']}x{s['height']}, seed {s['seed']}, {steps}, "
              f"guidance {s['guidance_scale']:g}, {result.timings['total_s']:.1f} s) from {sd.dir}")
    return 0


def _export_layout(args) -> int:
    """The artifact in another toolkit's folder layout (links, not copies), by its family's exporter."""
    from .families import FAMILIES, family_of_kind
    from .runtime.artifact import ArtifactError, describe, load

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder; export-layout never overwrites: "
                         "give a new folder")
    a = load(args.artifact)  # every file checked against the manifest before it is linked elsewhere
    family = family_of_kind(a.runtime.get("kind", ""))
    if family is None or family.export_layout is None:
        able = " and ".join(f.description for f in FAMILIES.values() if f.export_layout is not None) or "no"
        note = f"; {family.layout_note.format(dir=a.dir)}" if family is not None and family.layout_note else ""
        raise ArtifactError(f"{describe(a.dir, a.manifest)}: export-layout writes {able} artifacts only{note}")
    try:
        result = family.export_layout(a, out)
    except OSError as exc:  # e.g. a read-only place; nothing half-written stays (the layout is built beside it)
        raise ValueError(f"--out {out}: cannot write there ({exc.strerror}); choose another folder") from None
    copied = f", {result['copied_bytes'] / 2**20:.1f} MiB copied (another file system)" if result["copied_bytes"] else ""
    print(f"wrote {result['folder']}: {result['files']} files linked to {a.dir}{copied}"
          + (f"; left out: {', '.join(result['left_out'])}" if result.get("left_out") else ""))
    print(f"load it with {result['load']}")
    return 0


def _pocket_train(args) -> int:
    """Train a recipe's `train` source (its content-addressed source stage: reused when already built) and copy
    the trained weights to a folder with a pocket.json (every file's sha256, the command), which a recipe's
    `path` source reads back and verifies: the default build need not retrain (issue 16)."""
    import shutil

    from .config import load_recipe
    from .sources import write_pocket_manifest
    from .store import StageContext, run_stage
    from .tasks import plan_recipe, project_paths, walk

    project, recipes_dir, artifacts = project_paths()
    recipe = load_recipe(recipes_dir / f"{args.recipe}.yaml")
    if recipe.body.source.kind != "train":
        raise ValueError(f"recipe {args.recipe} has a {recipe.body.source.kind} source, not train: pocket-train "
                         f"trains a recipe whose source is `train:` (e.g. sd-pocket-train)")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.replace)):
        raise ValueError(f"--out {out}: exists and is not an empty folder; give a new folder or --replace")
    source = next(s for spec in plan_recipe(recipe, project).values() for s in walk(spec) if s.stage == "source")
    ctx = StageContext(root=artifacts, project_dir=project)
    print(f"training {args.recipe}'s source (reused if built: {source.out_dir(artifacts)})", flush=True)
    run_stage(source, ctx)
    record = json.loads(source.target(artifacts).read_text())
    model_dir = source.out_dir(artifacts) / record["model_dir"]
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_dir, staging, symlinks=False)
    command = f"onnxforge pocket-train --recipe {args.recipe} --out {args.out} --replace"
    manifest = write_pocket_manifest(staging, command, {"recipe": args.recipe, "source": record.get("source", {})})
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {out}: {len(manifest['files'])} files, {size / 2**20:.1f} MiB, each sha256 in {out}/pocket.json")
    return 0


def _build(args) -> int:
    try:
        import doit  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"building needs the build extra ({exc.name} is not installed): "
                         f"pip install 'onnxforge[build]'") from None
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    import importlib.util

    spec = importlib.util.spec_from_file_location("dodo", Path(args.dodo))
    if spec is None or not Path(args.dodo).is_file():
        raise ValueError(f"{args.dodo}: no dodo.py here; run from the project root or pass --dodo")
    dodo = importlib.util.module_from_spec(spec)
    cmd = ["build"] + ([f"recipes={','.join(args.recipes)}"] if args.recipes else [])
    sys.argv = ["doit"] + cmd  # doit reads `recipes=` from argv while loading dodo
    spec.loader.exec_module(dodo)
    return DoitMain(ModuleTaskLoader(dodo)).run(cmd)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write a creative image prompt (or any text) from a word",
                       description="Turn a word into a creative image prompt with a GPT-2 artifact (onnxruntime only).")
    g.add_argument("word", nargs="+", help="the word or phrase to start from")
    g.add_argument("--artifact", default=DEFAULT_TEXT_ARTIFACT,
                   help=f"variant folder (newest version) or version folder (default: {DEFAULT_TEXT_ARTIFACT})")
    g.add_argument("--raw", action="store_true", help="use the text as the prompt, without the creative template")
    g.add_argument("--max-tokens", type=int, default=48, help="new tokens at most (default 48)")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature, top-k, top-p)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature > 0 (default 0.8)")
    g.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens, 0 = off (default 50)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1] (default 0.95)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="penalty for repeated tokens, 1 = off (default: the artifact's, 1.2 unless its recipe says)")
    g.add_argument("--stop", action="append", default=[], help="stop when this string appears (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    g.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    g.add_argument("--json", action="store_true", help="print a JSON record instead of the text")
    g.set_defaults(func=_generate)

    i = sub.add_parser("inspect", help="print an artifact's manifest readably",
                       description="Show an artifact's source, stages, files, inputs/outputs, validation and benchmark.")
    i.add_argument("artifact", help="variant folder (newest version) or version folder")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the files")
    i.set_defaults(func=_inspect)

    for name, aliases, help_ in (("bench", [], "benchmark a recipe's variants side by side (any family)"),
                                 ("bench-sam", [], "alias of `bench` (kept for old scripts)"),
                                 ("bench-sd", [], "alias of `bench` (kept for old scripts)")):
        b = sub.add_parser(
            name, aliases=aliases, help=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
            description="Benchmark artifacts side by side: each measurement in its own process (peak RSS is its own), "
                        "all variants in one run,\nratios between them; prints a Markdown table, saves bench.json, "
                        "bench.md and bench.png, and records the figures\nin each artifact's manifest (`onnxforge "
                        "inspect` shows them). The family comes from the artifacts' manifests.",
            epilog="examples:\n"
                   "  onnxforge bench --recipe gpt2-tiny --runs 20\n"
                   "  onnxforge bench --recipe sam-tiny --image 320x240\n"
                   "  onnxforge bench --recipe sd-tiny --sizes 64 --image-steps 2\n"
                   "  onnxforge bench --artifact old=artifacts/sam-tiny/fp32/<version> --artifact new=artifacts/sam-tiny/fp32")
        _add_bench_targets(b)
        _add_bench_settings(b)
        b.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
        b.add_argument("--out", help="folder for bench.json/.md/.png (default: artifacts/<recipe>/bench/manual)")
        b.add_argument("--no-record", action="append", metavar="NAME",
                       help="leave this artifact's manifest as it is (e.g. one in a shared folder) (repeatable)")
        b.set_defaults(func=_bench)

    import os

    from .budgets import DEFAULT_REPS

    ck = sub.add_parser(
        "check", help="check built artifacts against their recipes' budgets (size, memory, latency ratios)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure what each recipe's `budgets:` name on its built variants (a short fixed workload, "
                    "repeated and\ninterleaved across variants), print budget, measured, margin and verdict, save "
                    "check.json and check.md\n(default: artifacts/<recipe>/check/), exit 1 naming each broken "
                    "budget. Same as `doit check`.",
        epilog="examples:\n"
               "  onnxforge check                      # every default recipe with budgets\n"
               "  onnxforge check --recipe sd-tiny --reps 5\n"
               "  ONNXFORGE_ARTIFACTS=/data/artifacts onnxforge check --recipe gpt2-medium-random --out report/")
    ck.add_argument("--recipe", help="recipe name (a file in the recipes folder without .yaml)")
    ck.add_argument("--recipes-dir", default=os.environ.get("ONNXFORGE_RECIPES", "recipes"),
                    help="recipes folder (default: $ONNXFORGE_RECIPES or recipes)")
    ck.add_argument("--artifacts", default=os.environ.get("ONNXFORGE_ARTIFACTS", "artifacts"),
                    help="artifacts root (default: $ONNXFORGE_ARTIFACTS or artifacts)")
    ck.add_argument("--reps", type=int, default=DEFAULT_REPS,
                    help=f"interleaved repetitions of the workload (default {DEFAULT_REPS})")
    ck.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    ck.add_argument("--out", help="folder for check.json and check.md (default: artifacts/<recipe>/check)")
    ck.set_defaults(func=_check)

    sg = sub.add_parser(
        "segment", help="select an object in a picture with Segment Anything (point, box or numbered candidates)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment an object with a SAM artifact (onnxruntime only): the encoder runs once per image,\n"
                    "each prompt only runs the decoder. Writes a mask PNG (255 = object) and an overlay PNG.",
        epilog="examples:\n"
               "  onnxforge segment photo.png --point 120,80 --out cat.png\n"
               "  onnxforge segment photo.png --point 120,80 --point 300,90 --negative --out cat.png\n"
               "  onnxforge segment photo.png --box 40,30,260,210 --out cat.png\n"
               "  onnxforge segment photo.png --everything --out labels.png      # numbered overlay: pick one\n"
               "  onnxforge segment photo.png --everything --pick 3 --out cat.png\n"
               "Coordinates are pixels of the original image, x to the right, y down. Gray and RGBA\n"
               "pictures are converted to RGB; sides from 8 to 8192 px are accepted.")
    sg.add_argument("image", help="the picture (PNG, JPEG, ...)")
    sg.add_argument("--artifact", default=None,
                    help="SAM or SAM 2.1 variant folder (newest version) or version folder (default: the fastest "
                         f"validated one built under {DEFAULT_ARTIFACTS}/ by its recorded benchmark, else the newest "
                         "recipe's reference variant, as the demo chooses)")
    sg.add_argument("--point", action=_PromptAction, metavar="X,Y", dest="prompts",
                    help="a point on the object (repeatable)")
    sg.add_argument("--negative", action=_PromptAction, nargs="?", const=None, metavar="X,Y", dest="prompts",
                    help="a point NOT on the object: `--negative X,Y`, or bare `--negative` right after "
                         "a --point to mark that point (repeatable)")
    sg.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box around the object (top-left, bottom-right); "
                                                          "combines with points")
    sg.add_argument("--everything", action="store_true",
                    help="find every object (grid of point prompts), number them largest first")
    sg.add_argument("--pick", type=int, metavar="N", help="with --everything: write the mask of candidate number N")
    sg.add_argument("--single-mask", action="store_true",
                    help="ask SAM for one mask instead of three and their best (better for several points)")
    sg.add_argument("--out", default="mask.png", help="mask PNG; with --everything and no --pick a label map "
                                                      "(pixel value = candidate number) (default: mask.png)")
    sg.add_argument("--overlay", help="overlay PNG (default: <out>-overlay.png beside --out)")
    sg.add_argument("--points-per-side", type=int, help="--everything grid size, 1 to 64 (default: the manifest's)")
    sg.add_argument("--points-per-batch", type=int, help="--everything: grid points per decoder call "
                                                         "(default: the manifest's; 32 in the full-size recipes)")
    sg.add_argument("--pred-iou-threshold", type=float, help="--everything: keep masks SAM rates above this "
                                                             "(<= 0 keeps all; default: the manifest's)")
    sg.add_argument("--stability-threshold", type=float, help="--everything: keep masks at least this stable "
                                                              "(<= 0 keeps all; default: the manifest's)")
    sg.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    sg.add_argument("--arena", action="store_true",
                    help="keep onnxruntime's memory arena for the encoder: faster from the second image on, "
                         "about 3 GiB more peak RSS at 1024 px")
    sg.add_argument("--json", action="store_true", help="print a JSON record instead of text")
    sg.set_defaults(func=_segment, prompts=[])

    im = sub.add_parser(
        "imagine", help="draw a picture from a prompt with Stable Diffusion (onnxruntime only)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Text to image with a Stable Diffusion artifact: numpy + onnxruntime + tokenizers, no torch.\n"
                    "Settings not given come from the artifact's manifest. The PNG carries the prompt, seed, steps,\n"
                    "scheduler and artifact versions in its text metadata; the same settings give the same picture.",
        epilog="examples:\n"
               "  onnxforge imagine \"a lighthouse at dusk, oil painting\" --seed 3 --out lighthouse.png\n"
               "  onnxforge imagine \"a red fox in snow\" --steps 30 --size 512x384 --scheduler dpm++2m --variant int8\n"
               "  onnxforge imagine \"a quiet harbor\" --negative \"blurry, text\" --guidance 9 --low-memory\n"
               "An empty prompt (\"\") asks for an unconditional sample: the model draws whatever it likes.\n"
               "Prompts longer than the text encoder reads (75 tokens) are truncated with a warning.")
    im.add_argument("prompt", nargs="+", help="what to draw")
    im.add_argument("--negative", default="", help="what to steer away from (used with guidance > 1)")
    im.add_argument("--steps", type=int, help="denoising steps (default: the manifest's; LCM artifacts take 1-8)")
    im.add_argument("--size", help="WIDTHxHEIGHT or one number for a square, multiples of 8 (default: the manifest's)")
    im.add_argument("--scheduler", help="pndm, ddim, euler, dpm++2m or lcm (default: the manifest's)")
    im.add_argument("--guidance", type=float, help="classifier-free guidance scale; <= 1 turns it off (default: the manifest's)")
    im.add_argument("--seed", type=int, help="random seed: the same seed and settings give the same picture (default: random)")
    im.add_argument("--variant", default="fp32", help="artifact variant under artifacts/<recipe>/ (default: fp32)")
    im.add_argument("--recipe", help=f"recipe name (default: the newest built pocket-world recipe, else "
                                     f"the newest fast-path one, e.g. sd-tiny-lcm, else {DEFAULT_SD_RECIPE})")
    im.add_argument("--artifacts", default="artifacts", help="artifacts root (default: artifacts)")
    im.add_argument("--artifact", help="variant or version folder; overrides --recipe/--variant")
    im.add_argument("--out", default="image.png", help="PNG to write (default: image.png)")
    im.add_argument("--low-memory", action="store_true", help="load one submodule at a time (slower, lower peak RSS)")
    im.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    im.add_argument("--no-progress", action="store_true", help="no progress bar")
    im.add_argument("--json", action="store_true", help="print a JSON record instead of text")
    im.set_defaults(func=_imagine)

    el = sub.add_parser(
        "export-layout", help="write an artifact in the folder layout another toolkit loads (SD: optimum's pipeline)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a Stable Diffusion artifact as the folder optimum's ORTStableDiffusionPipeline loads\n"
                    "(model_index.json, per-submodule folders with config.json, tokenizer and scheduler folders).\n"
                    "Every file is a hard link to the artifact's own (a copy only across file systems): no\n"
                    "gigabytes twice. The folder must not exist or be empty; nothing is ever overwritten.\n"
                    "GPT-2 artifacts need no layout: optimum's ORTModelForCausalLM opens their version folder.",
        epilog="example:\n"
               "  onnxforge export-layout --artifact artifacts/sd-tiny/int8 --out sd-tiny-int8-optimum\n"
               "  python -c 'from optimum.onnxruntime import ORTStableDiffusionPipeline as P; "
               "P.from_pretrained(\"sd-tiny-int8-optimum\")'")
    el.add_argument("--artifact", required=True, help="variant folder (newest version) or version folder")
    el.add_argument("--out", required=True, help="the folder to write (new, or empty)")
    el.set_defaults(func=_export_layout)

    from .demo_cli import add_parser as add_demo_parser

    add_demo_parser(sub)

    from .web import add_parser as add_web_parser

    add_web_parser(sub)

    pt = sub.add_parser("pocket-train", help="train a pocket model and write its weights folder (issue 16)",
                        description="Build a recipe's `train` source (trains once; reused when built) and copy the "
                                    "trained weights to --out with pocket.json (each file's sha256 and this command). "
                                    "The pocket recipes read those folders with `path:` and refuse a file whose "
                                    "digest differs. Example: onnxforge pocket-train --recipe sd-pocket-train "
                                    "--out pocket/sd --replace")
    pt.add_argument("--recipe", required=True, help="a recipe whose source is `train:` (e.g. sd-pocket-train)")
    pt.add_argument("--out", required=True, help="the folder to write (e.g. pocket/sd)")
    pt.add_argument("--replace", action="store_true", help="replace an existing --out folder")
    pt.set_defaults(func=_pocket_train)

    bu = sub.add_parser("build", help="build recipes (same as `doit build`)",
                        description="Build the default recipes, or the named ones, through doit (incremental).")
    bu.add_argument("recipes", nargs="*", help="recipe names (files in recipes/ without .yaml); default: the default ones")
    bu.add_argument("--dodo", default="dodo.py", help="path to dodo.py (default: ./dodo.py)")
    bu.set_defaults(func=_build)
    return p


_COORDINATE_FLAGS = ("--point", "--negative", "--box")


def _attach_negative_coordinates(argv: list[str]) -> list[str]:
    """`--point -5,10` -> `--point=-5,10`: argparse takes any word that starts with '-' and is not a plain
    number for an option, so a coordinate list with a leading minus would be "expected one argument"."""
    import re

    coords = re.compile(r"-[0-9.]+(,\s*-?[0-9.]+)+")
    out: list[str] = []
    for word in argv:
        if out and out[-1] in _COORDINATE_FLAGS and coords.fullmatch(word):
            out[-1] = f"{out[-1]}={word}"
        else:
            out.append(word)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(_attach_negative_coordinates(sys.argv[1:] if argv is None else list(argv)))
    from .config import RecipeError
    from .runtime.artifact import ArtifactError

    try:
        return args.func(args)
    except (ArtifactError, RecipeError, ValueError, FileNotFoundError) as exc:
        print(f"onnxforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"onnxforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
