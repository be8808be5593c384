"""`onnxforge demo`: word -> creative prompt -> picture -> object -> mask -> edit, in the terminal.

Interactive (no --word/--prompt/--replay): asks each step, Enter takes the default shown in [brackets],
`q` stops keeping what was saved, a bad answer is explained and asked again. Scripted (--word or
--prompt): runs every step from the flags, prints one line per saved file on stdout (everything else on
stderr), exit 0. Ctrl-C at any point: files already saved stay (each is written whole or not at all),
run.json says what was done, exit 130. The pipeline itself is onnxforge.runtime.demo.Demo.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np

from .runtime.demo import DEFAULT_EDIT as DEFAULT_EDIT_TEXT
from .runtime.edits import GRAMMAR

EPILOG = f"""\
examples:
  onnxforge demo                                                   # interactive
  onnxforge demo --word castle --pick 2 --edit "make it red" --seed 7 --out runs/
  onnxforge demo --prompt "a red boat on a lake" --point 120,80 --point=-30,40 --edit "blur the background"
  onnxforge demo --word fox --box 10,10,50,60 --edit "replace it with a white cat" --strength 0.9
  onnxforge demo --replay runs/20261130-120000-castle/run.json    # the same run again, in a new folder
  onnxforge demo --word castle --point 256,256 --size 512 --steps 25 --low-memory \\
      --text-model gpt2-medium-random/kv-int8 --image-model sd-v1-4-random/int8 --mask-model sam-vit-base-random/int8

edits (--edit, or the answer to "What should the edit do?"):
{GRAMMAR}

Choosing the object: --pick N (SAM's numbered candidates, largest first, drawn on candidates.png),
--point X,Y (repeatable; --point=-X,Y marks a point that is NOT the object), --box X0,Y0,X1,Y1; in
pixels of the picture, x to the right, y down. Interactive answers use the same forms: `2`, `120,80
-30,40`, `box 10,10,50,60`.

Models: by default the newest built recipe per family (GPT-2, Stable Diffusion, SAM), and in it the
fastest variant that passed validation per the benchmark recorded in its manifest (else the reference
variant); --text-model/--image-model/--mask-model take a recipe, recipe/variant or a folder."""

DEFAULT_WORD = "lighthouse"


class Quit(Exception):
    """The user typed q."""


def add_parser(sub) -> argparse.ArgumentParser:
    d = sub.add_parser("demo", help="the full demo: word -> prompt -> picture -> object -> mask -> edit",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__, epilog=EPILOG)
    d.add_argument("--word", help="the word or phrase GPT-2 turns into a prompt (scripted mode)")
    d.add_argument("--prompt", help="use this picture prompt instead of GPT-2's (scripted mode)")
    d.add_argument("--pick", type=int, metavar="N", help="candidate number N (default: 1 when no --point/--box)")
    d.add_argument("--point", action="append", default=[], metavar="X,Y",
                   help="a point on the object (repeatable); --point=-X,Y for a point NOT on it")
    d.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box around the object")
    d.add_argument("--edit", help=f"what the edit should do (default in scripted mode: {DEFAULT_EDIT_TEXT!r})")
    d.add_argument("--strength", type=float, help="generative edits: how far into the noise, in (0, 1] "
                                                  "(default: 0.8 replace, 0.7 make it, 1.0 remove)")
    d.add_argument("--edit-steps", type=int, help="generative edits: the schedule's steps (default: --steps)")
    d.add_argument("--seed", type=int, help="seed for the prompt, the picture and the edit (default: random, "
                                            "recorded in run.json)")
    d.add_argument("--size", help="picture size WIDTHxHEIGHT or one number (default: the SD manifest's)")
    d.add_argument("--steps", type=int, help="denoising steps (default: the SD manifest's)")
    d.add_argument("--scheduler", help="pndm, ddim, euler, dpm++2m or lcm (default: the SD manifest's)")
    d.add_argument("--out", default="runs", help="folder for the run folders (default: runs)")
    d.add_argument("--artifacts", default="artifacts", help="artifacts root (default: artifacts)")
    d.add_argument("--text-model", help="GPT-2 artifact: recipe, recipe/variant or folder (default: automatic)")
    d.add_argument("--image-model", help="Stable Diffusion artifact: recipe, recipe/variant or folder")
    d.add_argument("--mask-model", help="SAM artifact: recipe, recipe/variant or folder")
    d.add_argument("--low-memory", action="store_true",
                   help="one large model loaded at a time, SD one submodule at a time, no ORT arena "
                        "(for the full-size models on a small machine; slower)")
    d.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    d.add_argument("--replay", metavar="RUN_JSON", help="make a recorded run again (its models, seed, sizes, "
                                                        "pick and edit) in a new run folder")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=main)
    return d


# ---- small parsers (one-line errors that show the expected form) ----------------------------------


def parse_numbers(text: str, count: int, what: str, example: str) -> tuple[float, ...]:
    """'x,y' -> (x, y) for the demo's answers and every command's coordinates; a mistake is one line."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count or not all(np.isfinite(values)):
        raise ValueError(f"{what} {text!r}: expected {count} comma-separated numbers, e.g. {example}")
    return values


def parse_point(text: str) -> tuple[tuple[float, float], int]:
    """'x,y' -> ((x, y), 1); '-x,y' -> ((x, y), 0), a point that is not the object."""
    text = text.strip()
    label = 0 if text.startswith("-") else 1
    return parse_numbers(text.lstrip("-+"), 2, "point", "120,80 (or -120,80 for 'not here')"), label


def parse_size(text: str) -> tuple[int, int]:
    w, sep, h = str(text).lower().partition("x")
    if not w.strip().isdigit() or (sep and not h.strip().isdigit()):
        raise ValueError(f"--size {text!r}: expected WIDTHxHEIGHT or one number for a square, e.g. --size 512x384")
    return (int(w), int(h)) if sep else (int(w), int(w))


def parse_object(answer: str, n_candidates: int) -> dict:
    """An interactive answer -> select() keyword arguments."""
    a = answer.strip().lower()
    allowed = (f"a number from 1 to {n_candidates}, " if n_candidates else "") + \
        "points x,y (several separated by spaces, -x,y = not here), or box x0,y0,x1,y1"
    if re.fullmatch(r"\d+", a):
        return {"number": int(a)}
    if m := re.fullmatch(r"box\s+(\S+)", a):
        return {"box": parse_numbers(m.group(1), 4, "box", "10,20,200,180")}
    if re.fullmatch(r"[\d.]+,[\d.]+,[\d.]+,[\d.]+", a):
        return {"box": parse_numbers(a, 4, "box", "10,20,200,180")}
    tokens = a.replace(";", " ").split()
    if tokens and all(re.fullmatch(r"[-+]?[\d.]+,[\d.]+", t) for t in tokens):
        parsed = [parse_point(t) for t in tokens]
        return {"points": [p for p, _ in parsed], "labels": [lab for _, lab in parsed]}
    raise ValueError(f"{answer!r} is not understood: answer {allowed}")


# ---- the command --------------------------------------------------------------------------------------


def main(args) -> int:
    from .runtime.demo import Demo, load_run

    scripted = bool(args.word or args.prompt is not None or args.replay)
    if not scripted and not sys.stdin.isatty():
        raise ValueError("no terminal to ask questions on: pass --word WORD (or --prompt TEXT) for the scripted "
                         "demo, see `onnxforge demo --help`")
    settings = replay_settings(load_run(args.replay), args, args.replay) if args.replay else flag_settings(args, scripted)
    out = sys.stdout

    def log(line: str) -> None:
        # scripted: stdout carries exactly one line per saved file, the rest goes to stderr
        stream = out if (not scripted or line.startswith("saved ")) else sys.stderr
        print(line, file=stream, flush=True)

    demo = Demo(artifacts=args.artifacts, out=args.out, models=settings["models"], low_memory=args.low_memory,
                threads=args.threads, log=log, progress=not args.no_progress)
    try:
        if scripted:
            run_scripted(demo, settings)
        else:
            run_interactive(demo, settings)
    except Quit:
        kept = ", ".join(p.name for p in demo.saved) or "nothing"
        print(f"stopped; kept {kept}" + (f" in {demo.run_dir}" if demo.run_dir else ""), flush=True)
        return 0
    except KeyboardInterrupt:
        if demo.run_dir is not None:
            demo.record["interrupted"] = True
            demo._write_record()
        kept = ", ".join(p.name for p in demo.saved) or "nothing"
        print(f"onnxforge demo: interrupted; kept {kept}" + (f" in {demo.run_dir}" if demo.run_dir else ""),
              file=sys.stderr, flush=True)
        return 130
    return 0


def flag_settings(args, scripted: bool) -> dict:
    """Check every flag before any model runs, so a mistake costs nothing."""
    from .runtime.edits import parse_edit

    s = {"models": {"text": args.text_model, "image": args.image_model, "mask": args.mask_model},
         "word": args.word, "prompt": args.prompt, "seed": args.seed, "steps": args.steps,
         "scheduler": args.scheduler, "size": parse_size(args.size) if args.size else None,
         "strength": args.strength, "edit_steps": args.edit_steps, "pick": None, "edit": None}
    if args.word is not None and not args.word.strip():
        raise ValueError("--word is empty: give a word or phrase, e.g. --word castle")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty: give the picture's description, or leave --prompt out to let GPT-2 "
                         "write one from --word")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed {args.seed}: a whole number >= 0")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise ValueError(f"--strength {args.strength}: must be in (0, 1] (1 = redraw from pure noise)")
    if scripted:
        points = [parse_point(p) for p in args.point]
        box = parse_numbers(args.box, 4, "--box", "10,20,200,180") if args.box else None
        if args.pick is not None and (points or box):
            raise ValueError("choose the object by --pick N OR by --point/--box, not both")
        if args.pick is not None and args.pick < 1:
            raise ValueError(f"--pick {args.pick}: candidates are numbered from 1")
        if points or box:
            s["pick"] = {"points": [p for p, _ in points], "labels": [lab for _, lab in points], "box": box}
        else:
            s["pick"] = {"number": args.pick or 1}
        s["edit"] = args.edit if args.edit is not None else DEFAULT_EDIT_TEXT
        parse_edit(s["edit"])  # not understood -> the grammar, before anything runs
    elif args.pick is not None or args.point or args.box or args.edit:
        raise ValueError("--pick/--point/--box/--edit belong to the scripted demo: add --word WORD (or --prompt)")
    if s["seed"] is None:
        s["seed"] = int(np.random.SeedSequence().entropy % 2**31)
    return s


def replay_settings(run: dict, args, run_json=None) -> dict:
    """A run.json -> the same settings; its models exactly (the version folders it names); an uploaded
    picture (the web page's) is read back from image.png beside run.json."""
    from pathlib import Path

    models = {}
    for role, a in run["artifacts"].items():
        if not Path(a["path"]).is_dir():
            raise ValueError(f"--replay: the run used {a.get('recipe')}/{a.get('variant')} version {a.get('version')} "
                             f"({a['path']}), which is not here: build it with `doit build recipes={a.get('recipe')}` "
                             "(the same recipe and toolchain give the same version)")
        models[role] = a["path"]
    pick = run.get("pick")
    if pick and "number" not in pick:
        pick = {"points": [tuple(p) for p in pick.get("points", [])], "labels": pick.get("labels", []),
                "box": tuple(pick["box"]) if pick.get("box") else None}
    edit = run.get("edit") or {}
    return {"models": models, "word": run.get("word"),
            "picture_file": (Path(run_json).parent / "image.png" if run.get("picture_source") == "upload" and run_json
                             else None),
            "prompt": run["prompt"] if run["prompt_source"] == "given" else None, "seed": run["seed"],
            "prompt_seed": run.get("prompt_seed", run["seed"]),
            "steps": run["steps"], "scheduler": run.get("scheduler"), "size": tuple(run["size"]),
            "strength": edit.get("strength"), "edit_steps": edit.get("steps"), "pick": pick,
            "edit": edit.get("text"), "expect_prompt": run["prompt"]}


def run_scripted(demo, s: dict) -> None:
    # 1. choose the artifacts first: a missing one stops the run before any work
    upload = s.get("picture_file")  # a replayed web run whose picture was uploaded, not drawn
    # An uploaded picture needs Stable Diffusion only where the run used it (a generative edit records it).
    drawn = not upload or s["models"].get("image")
    roles = (["text"] if s["prompt"] is None and not upload else []) + (["image"] if drawn else []) \
        + (["mask"] if s["pick"] else [])
    for role in roles:
        demo.choice(role)
    # 2. the run folder
    demo.start_run(s["word"], s["seed"])
    # 3. the prompt
    if s["prompt"] is not None:
        demo.use_prompt(s["prompt"])
    elif not upload:
        prompt = demo.prompt(s["word"], seed=s.get("prompt_seed"))
        if s.get("expect_prompt") and prompt != s["expect_prompt"]:
            demo.log("warning: GPT-2 wrote a different prompt than the recorded run")
        demo.log(f"prompt: {prompt}")
    # 4. the picture
    if upload:
        from PIL import Image

        with Image.open(upload) as im:
            demo.use_picture(im, name=str(upload))
    else:
        demo.picture(size=s["size"], steps=s["steps"], scheduler=s["scheduler"])
    # 5. the object and its mask
    pick = s["pick"]
    if pick:
        if "number" in pick:
            demo.candidates()
            demo.select(number=pick["number"])
        else:
            demo.select(points=pick["points"] or None, labels=pick["labels"] or None, box=pick["box"])
        # 6. the edit
        if s["edit"]:
            demo.edit(s["edit"], strength=s["strength"], steps=s["edit_steps"])
    demo.finish()
    demo.log(demo.report())
    demo.log(f"run folder {demo.run_dir}; again: {demo.command()}")


# ---- interactive ------------------------------------------------------------------------------------


def ask(question: str, default: str | None, act):
    """Ask until act(answer) succeeds. Enter takes the default; q quits; a ValueError is shown and asked again."""
    while True:
        hint = f" [{default}]" if default else ""
        try:
            answer = input(f"{question}{hint}: ")
        except EOFError:
            raise Quit from None
        answer = answer.strip()
        if answer.lower() in ("q", "quit", "exit"):
            raise Quit
        if not answer and default is not None:
            answer = default
        try:
            return act(answer)
        except ValueError as exc:
            print(f"  {exc}", flush=True)


def run_interactive(demo, s: dict) -> None:
    print("onnxforge demo: a word becomes a picture you can edit. Enter takes the [default], q stops.", flush=True)
    for role in ("text", "image", "mask"):
        demo.choice(role)

    def start(word):
        if not word.strip():
            raise ValueError("type a word or phrase, e.g. castle (or q to stop)")
        demo.start_run(word, s["seed"])
        return word.strip()

    word = ask("Word or phrase", DEFAULT_WORD, start)
    print(f"run folder {demo.run_dir}", flush=True)

    # the prompt: accept, regenerate, or type one's own
    seed = s["seed"]
    while True:
        prompt = demo.prompt(word, seed=seed)
        print(f"Prompt: {prompt}", flush=True)

        def decide(answer):
            if answer in ("", "y", "yes", "ok"):
                return "accept"
            if answer.lower() == "r":
                return "again"
            demo.use_prompt(answer)
            return "own"

        verdict = ask("Enter = draw it, r = write another, or type your own prompt", None, decide)
        if verdict == "again":
            seed += 1
            continue
        break

    print("Drawing the picture ...", flush=True)
    demo.picture(size=s["size"], steps=s["steps"], scheduler=s["scheduler"])
    print(f"Picture: {demo.run_dir / 'image.png'}", flush=True)

    found = demo.candidates()
    listing = ", ".join(f"{n} ({c.area} px)" for n, c in enumerate(found, start=1)) or "none"
    print(f"Objects SAM found, numbered on {demo.run_dir / 'candidates.png'}: {listing}", flush=True)

    def select(answer):
        return demo.select(**parse_object(answer, len(found)))

    ask("Which object? a number, points x,y (-x,y = not here), or box x0,y0,x1,y1", "1" if found else None, select)
    print(f"Mask: {demo.run_dir / 'mask.png'} (overlay {demo.run_dir / 'mask-overlay.png'})", flush=True)

    def edit(answer):
        if answer in ("?", "help"):
            raise ValueError(f"edits understood:\n{GRAMMAR}")
        return demo.edit(answer, strength=s["strength"], steps=s["edit_steps"])

    ask("What should the edit do? (? lists them)", DEFAULT_EDIT_TEXT, edit)
    print(f"Edited: {demo.run_dir / 'edited.png'}; side by side: {demo.run_dir / 'sheet.png'}", flush=True)
    demo.finish()
    print(demo.report(), flush=True)
    print(f"The same run, scripted: {demo.command()}", flush=True)
