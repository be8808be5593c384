"""The demo pipeline: word -> creative prompt -> picture -> object -> mask -> edit -> saved picture.

One object, `Demo`, holds the chosen artifacts (loaded lazily, per step) and runs each step as a method;
the terminal front end (`onnxforge demo`, demo_cli.py) and any later web page drive it. numpy +
onnxruntime + tokenizers + Pillow only, never torch.

    demo = Demo(artifacts="artifacts", out="runs", low_memory=False)
    demo.start_run("castle", seed=7)
    prompt = demo.prompt("castle")                 # GPT-2 (or demo.use_prompt("a castle at dusk"))
    demo.picture(size=(64, 64), steps=10)          # Stable Diffusion -> image.png (or demo.use_picture(img))
    demo.candidates()                              # SAM "everything" -> candidates.png, numbered
    demo.select(number=2)                          # or points=[(x, y)], labels=[1], or box=(x0, y0, x1, y1)
    demo.edit("make it red")                       # edited.png + sheet.png (original | mask | edited)
    demo.finish()                                  # run.json complete; demo.report() is the timing line

Every file is written under a temporary name and renamed into place, and run.json is rewritten after
each step, so an interrupted run leaves only complete files and a run.json that says what was done.
Artifact choice: per family the newest built recipe, and in it the fastest variant that passed
validation according to the benchmark figures recorded in its manifest (the reference variant when none
are recorded); explicit choices (recipe, recipe/variant, or a folder) override it.
"""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import artifact as art
from . import edits as ed

__all__ = ["Demo", "Choice", "choose_artifact", "default_image_recipe", "fast_path_recipe", "is_fast_path", "is_pocket", "ROLES", "load_run",
           "RunFileError"]

RUN_SCHEMA = 1

# role -> what the demo needs of it. "reference" is the variant used when no benchmark says otherwise.
ROLES = {
    "text": {"kind": "causal-lm", "label": "GPT-2", "default_recipe": "gpt2-tiny", "reference": "kv",
             "metric": (("decode_ms_per_token", "mean"), "ms/token")},
    "image": {"kind": "sd", "label": "Stable Diffusion", "default_recipe": "sd-tiny", "reference": "fp32",
              "metric": (("image", "image_ms", "mean"), "ms/picture")},
    # SAM and SAM 2.1 artifacts both serve; the fastest validated one built wins (across recipes).
    "mask": {"kind": "sam", "kinds": ("sam", "sam2"), "label": "Segment Anything", "default_recipe": "sam-tiny",
             "reference": "fp32", "metric": (("encoder_ms", "mean"), "ms/encoder run"), "across_recipes": True},
}
STAGES = ("prompt", "picture", "candidates", "mask", "edit")
DEFAULT_EDIT = "make it red"


# ---- artifact choice -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    role: str
    dir: Path  # the version folder
    recipe: str
    variant: str
    version: str
    why: str

    def record(self) -> dict:
        return {"recipe": self.recipe, "variant": self.variant, "version": self.version, "path": str(self.dir),
                "why": self.why}

    def line(self) -> str:
        return f"{ROLES[self.role]['label']}: {self.recipe}/{self.variant} {self.version} ({self.why})"


def _built(root: Path) -> list[tuple[Path, dict]]:
    """(version dir, manifest) of the newest version of every built variant under root."""
    found = []
    if not root.is_dir():
        return found
    for recipe in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for variant in sorted(p for p in recipe.iterdir() if p.is_dir() and (p / art.LATEST).is_file()):
            try:
                vdir = art.resolve(variant)
                found.append((vdir, art.read_manifest(vdir)))
            except art.ArtifactError:
                continue  # a half-cleaned or foreign folder is not a candidate
    return found


def _metric(manifest: dict, path: tuple) -> float | None:
    value = manifest.get("benchmark") or {}
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _choice(role: str, vdir: Path, m: dict, why: str) -> Choice:
    a = m["artifact"]
    return Choice(role, vdir, a["recipe"], a["variant"], a["version"], why)


def _pick_variant(role: str, rows: list[tuple[Path, dict]], why_recipe: str) -> Choice:
    spec = ROLES[role]
    path, unit = spec["metric"]
    passed = [(d, m) for d, m in rows if (m.get("validation") or {}).get("passed")]
    if not passed:
        recipe = rows[0][1]["artifact"]["recipe"]
        raise art.ArtifactError(f"no variant of {recipe} passed validation: rebuild with `doit build recipes={recipe}`")
    timed = [(_metric(m, path), d, m) for d, m in passed if _metric(m, path) is not None]
    if timed:
        timed.sort(key=lambda r: r[0])
        best, d, m = timed[0]
        others = ", ".join(f"{mm['artifact']['variant']} {v:.4g}" for v, _, mm in timed[1:])
        why = (f"{why_recipe}; fastest validated variant by its recorded benchmark: {best:.4g} {unit}"
               + (f" vs {others}" if others else ""))
        return _choice(role, d, m, why)
    ref = [(d, m) for d, m in passed if m["artifact"]["variant"] == spec["reference"]]
    d, m = ref[0] if ref else sorted(passed, key=lambda r: r[1]["artifact"]["variant"])[0]
    why = (f"{why_recipe}; no benchmark recorded in its manifests, so the "
           + ("reference variant" if ref else "first validated variant"))
    return _choice(role, d, m, why)


def choose_artifact(role: str, root: str | Path = "artifacts", explicit: str | Path | None = None) -> Choice:
    """The artifact a role uses: `explicit` (recipe, recipe/variant or a folder) or the automatic choice."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    spec, root = ROLES[role], Path(root)
    if explicit:
        target = Path(explicit)
        if not target.exists() and (root / target).exists():
            target = root / target
        if not target.exists():
            recipe = str(explicit).strip("/").split("/")[0]
            raise art.ArtifactError(f"no built artifact {explicit!r} (looked in {Path(explicit)} and {root / explicit}): "
                                    f"build it with `doit build recipes={recipe}`")
        if (target / art.MANIFEST).is_file() or (target / art.LATEST).is_file():
            vdir = art.resolve(target)
            m = art.read_manifest(vdir)
            _check_kind(role, vdir, m)
            return _choice(role, vdir, m, f"chosen explicitly ({explicit})")
        rows = [(d, m) for d, m in _built(target.parent) if m["artifact"]["recipe"] == target.name]
        if not rows:
            raise art.ArtifactError(f"{target} holds no built variant: build it with `doit build recipes={target.name}`")
        _check_kind(role, rows[0][0], rows[0][1])
        return _pick_variant(role, rows, f"recipe chosen explicitly ({explicit})")
    rows = [(d, m) for d, m in _built(root) if m.get("runtime", {}).get("kind") in _kinds(role)]
    if not rows:
        raise art.ArtifactError(f"no {spec['label']} artifact is built under {root}/: build one with "
                                f"`doit build recipes={spec['default_recipe']}` (or `doit build` for all defaults)")
    # Models trained on the pocket world (issue 16) draw and mask what the captions say: when one is built it
    # wins over the random-weight ones, whose pictures are noise.
    pocket = [(d, m) for d, m in rows if is_pocket(m)]
    rows = pocket or rows
    path, _ = spec["metric"]
    timed = [r for r in rows if (r[1].get("validation") or {}).get("passed") and _metric(r[1], path) is not None]
    if spec.get("across_recipes") and timed:
        return _pick_variant(role, timed, "fastest validated variant built, of every recipe with a recorded benchmark")
    # A fast-path recipe (e.g. LCM with one-pass guidance) wins over the others when one is built.
    fast = [(d, m) for d, m in rows if is_fast_path(m)]
    pool = fast or rows
    newest = max(pool, key=lambda r: r[1]["artifact"].get("created", ""))[1]["artifact"]["recipe"]
    recipes = sorted({m["artifact"]["recipe"] for _, m in pool})
    kind = f"fast-path {spec['label']} recipe ({FAST_PATH_WHY})" if fast else f"{spec['label']} recipe"
    kind = f"pocket-world {kind}" if pocket else kind
    why = f"newest built {kind}" + (f" of {', '.join(recipes)}" if len(recipes) > 1 else "")
    return _pick_variant(role, [(d, m) for d, m in rows if m["artifact"]["recipe"] == newest], why)


def _kinds(role: str) -> tuple:
    return tuple(ROLES[role].get("kinds", (ROLES[role]["kind"],)))


FAST_PATH_WHY = "LCM, one-pass guidance"


def is_fast_path(manifest: dict) -> bool:
    """An SD artifact made for few-step pictures: LCM by default and a batch-1 UNet (no negative pass)."""
    rt = manifest.get("runtime") or {}
    return rt.get("kind") == "sd" and rt.get("scheduler") == "lcm" and rt.get("unet_batch") == 1


def is_pocket(manifest: dict) -> bool:
    """An artifact trained on the pocket world (a `train` source, or committed pocket weights read by `path`)."""
    source = manifest.get("source") or {}
    return bool(source.get("pocket") or source.get("world"))


def default_image_recipe(root: str | Path) -> str | None:
    """imagine's default: the newest built validated pocket-world SD recipe, else the newest fast-path one."""
    built = [m for _, m in _built(Path(root)) if (m.get("runtime") or {}).get("kind") == "sd"
             and (m.get("validation") or {}).get("passed")]
    for wanted in (is_pocket, is_fast_path):
        hits = [m for m in built if wanted(m)]
        if hits:
            return max(hits, key=lambda m: m["artifact"].get("created", ""))["artifact"]["recipe"]
    return None


def fast_path_recipe(root: str | Path) -> str | None:
    """The newest built fast-path SD recipe under root (imagine's default when one is built), or None."""
    fast = [m for _, m in _built(Path(root)) if is_fast_path(m) and (m.get("validation") or {}).get("passed")]
    return max(fast, key=lambda m: m["artifact"].get("created", ""))["artifact"]["recipe"] if fast else None


def _check_kind(role: str, vdir: Path, m: dict) -> None:
    kind = m.get("runtime", {}).get("kind")
    if kind not in _kinds(role):
        raise art.ArtifactError(f"{vdir} is a {kind!r} artifact, not {ROLES[role]['label']} "
                                f"({ROLES[role]['kind']!r})")


# ---- run.json ------------------------------------------------------------------------------------------


class RunFileError(ValueError):
    """A run.json that cannot be replayed; the message names the file and the key."""


def load_run(path: str | Path) -> dict:
    """Read and check a run.json for --replay: the settings needed to make the same run again."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"{path}: no such run file (pass the run.json of an earlier run)")
    try:
        run = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFileError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)}); pass the run.json a demo "
                           "run wrote") from None

    def bad(key, want):
        got = run.get(key, "<missing>") if isinstance(run, dict) else run
        return RunFileError(f"{path}: {key!r} must be {want} (got {got!r}); pass the run.json a demo run wrote")

    if not isinstance(run, dict) or run.get("schema") != RUN_SCHEMA:
        raise bad("schema", f"{RUN_SCHEMA} (a demo run.json)")

    def whole(v, lo=0):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    uploaded = run.get("picture_source") == "upload"  # the user's own picture: image.png beside run.json
    if run.get("picture_source", "sd") not in ("sd", "upload"):
        raise bad("picture_source", "'sd' or 'upload'")
    if uploaded and not (path.parent / "image.png").is_file():
        raise RunFileError(f"{path}: the run used an uploaded picture, but {path.parent / 'image.png'} is "
                           "missing; replay needs the run folder as the run wrote it")
    if run.get("prompt_source") not in ("gpt2", "given") and not (uploaded and run.get("prompt_source") is None):
        raise bad("prompt_source", "'gpt2' or 'given'")
    if run.get("prompt_source") and (not isinstance(run.get("prompt"), str)
                                     or (run["prompt_source"] == "gpt2" and not isinstance(run.get("word"), str))):
        raise bad("prompt" if not isinstance(run.get("prompt"), str) else "word", "text")
    if not whole(run.get("seed")):
        raise bad("seed", "a whole number >= 0")
    if "prompt_seed" in run and not whole(run["prompt_seed"]):
        raise bad("prompt_seed", "a whole number >= 0")
    size = run.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(whole(v, 1) for v in size)):
        raise bad("size", "[width, height]")
    if not whole(run.get("steps"), 1) and not (uploaded and run.get("steps") is None):
        raise bad("steps", "a whole number >= 1")
    pick = run.get("pick")
    if pick is not None:
        ok = isinstance(pick, dict) and (
            (set(pick) == {"number"} and whole(pick["number"], 1))
            or (set(pick) <= {"points", "labels", "box"} and pick and _points_ok(pick)))
        if not ok:
            raise bad("pick", '{"number": N} or {"points": [[x, y], ...], "labels": [1|0, ...]} and/or {"box": [x0, y0, x1, y1]}')
    edit = run.get("edit")
    if edit is not None and not (isinstance(edit, dict) and isinstance(edit.get("text"), str)):
        raise bad("edit", '{"text": "make it red", ...}')
    arts = run.get("artifacts")
    if not isinstance(arts, dict) or not all(isinstance(v, dict) and isinstance(v.get("path"), str)
                                             for v in arts.values()):
        raise bad("artifacts", "a map of role -> {recipe, variant, version, path}")
    return run


def _points_ok(pick: dict) -> bool:
    pts, labels, box = pick.get("points"), pick.get("labels"), pick.get("box")
    num = (int, float)
    if pts is not None:
        if not (isinstance(pts, list) and all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, num) for v in p)
                                              for p in pts)):
            return False
        if labels is not None and not (isinstance(labels, list) and len(labels) == len(pts)
                                       and all(v in (0, 1) for v in labels)):
            return False
    if box is not None and not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, num) for v in box)):
        return False
    return pts is not None or box is not None


# ---- the pipeline -------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-")
    return s or "run"


class Demo:
    """The demo's state and steps. `log` receives one line per event (saved files included)."""

    def __init__(self, artifacts: str | Path = "artifacts", out: str | Path = "runs", models: dict | None = None,
                 low_memory: bool = False, threads: int | None = None, log=print, progress: bool = False):
        self.root, self.out = Path(artifacts), Path(out)
        self.explicit = {k: v for k, v in (models or {}).items() if v}
        unknown = set(self.explicit) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown model role(s) {sorted(unknown)}; one of {', '.join(ROLES)}")
        self.low_memory, self.threads, self.log, self.progress = low_memory, threads, log, progress
        self._choices: dict[str, Choice] = {}
        self._models: dict = {}
        self.run_dir: Path | None = None
        self.record: dict = {}
        self.saved: list[Path] = []
        self.image = self.mask = self.edited = None
        self.found = []  # SAM candidates
        # on_step(stage, i, t): called after every denoising step of picture() and of generative edits
        # (i from 0, t the timestep, falling towards 0); an exception raised there stops the step cleanly
        # (the web page's cancel button)
        self.on_step = None

    def share(self, log=print) -> "Demo":
        """Another Demo (its own run and state) over the same artifacts and loaded models: one per visitor
        of the web page, so models load once per process."""
        other = Demo(self.root, self.out, self.explicit, self.low_memory, self.threads, log, self.progress)
        other._choices, other._models = self._choices, self._models
        return other

    def _callback(self, stage: str):
        hook = self.on_step
        return None if hook is None else (lambda i, t, x: hook(stage, i, float(t)))

    # ---- artifacts ----

    def choice(self, role: str) -> Choice:
        if role not in self._choices:
            self._choices[role] = choose_artifact(role, self.root, self.explicit.get(role))
            self.log(f"using {self._choices[role].line()}")
        return self._choices[role]

    def model(self, role: str):
        """The loaded model for a role; in low-memory mode every other large model is dropped first."""
        if role not in self._models:
            if self.low_memory:
                for other in list(self._models):
                    del self._models[other]
                gc.collect()
            c = self.choice(role)
            if role == "text":
                from .text import TextGenerator
                self._models[role] = TextGenerator(c.dir, threads=self.threads)
            elif role == "image":
                from .sd import StableDiffusion
                self._models[role] = StableDiffusion(c.dir, threads=self.threads, low_memory=self.low_memory)
            else:
                from .sam import open_predictor
                self._models[role] = open_predictor(c.dir, threads=self.threads, low_memory=True)
        return self._models[role]

    @property
    def loaded(self) -> list[str]:
        return sorted(self._models)

    # ---- the run folder ----

    def start_run(self, word: str | None, seed: int, name: str | None = None) -> Path:
        """Make the run folder (checked writable) and the run record."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
        base = name or f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(word or 'prompt')}"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            run_dir = self.out / base
            n = 1
            while run_dir.exists():
                n += 1
                run_dir = self.out / f"{base}-{n}"
            run_dir.mkdir()
            probe = run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"{self.out}: cannot write the run folder there ({exc.strerror or exc}); "
                             f"pass --out with a writable folder") from None
        self.run_dir = run_dir
        self.record = {"schema": RUN_SCHEMA, "word": word, "prompt": None, "prompt_source": None, "seed": int(seed),
                       "size": None, "steps": None, "scheduler": None, "pick": None, "edit": None,
                       "low_memory": self.low_memory, "artifacts": {}, "files": {}, "seconds": {},
                       "peak_rss_mib": None, "notes": [], "completed": [], "finished": False,
                       "cpu": _cpu_name()}
        self.saved, self.image, self.mask, self.edited, self.found = [], None, None, None, []
        self._write_record()
        return run_dir

    def _require_run(self):
        if self.run_dir is None:
            raise ValueError("no run started: call start_run(word, seed) first")

    def _save(self, name: str, write) -> Path:
        """write(tmp_path) then rename: a file in the run folder is complete or absent."""
        final = self.run_dir / name
        tmp = self.run_dir / f".{Path(name).stem}.partial{Path(name).suffix}"
        try:
            write(tmp)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        if final not in self.saved:
            self.saved.append(final)
        self.record["files"][Path(name).stem] = name
        self.log(f"saved {final}")
        return final

    def _write_record(self) -> None:
        self.record["peak_rss_mib"] = peak_rss_mib()
        art.write_json_atomic(self.run_dir / "run.json", self.record)

    def _stage(self, name: str, started: float) -> None:
        self.record["seconds"][name] = round(self.record["seconds"].get(name, 0.0) + time.perf_counter() - started, 3)
        if name not in self.record["completed"]:
            self.record["completed"].append(name)
        self._write_record()

    def _note(self, text: str) -> None:
        self.record["notes"].append(text)
        self.log(f"warning: {text}")

    def _use(self, role: str):
        model = self.model(role)
        self.record["artifacts"][role] = self.choice(role).record()
        return model

    # ---- 1-2. the prompt ----

    def prompt(self, word: str, seed: int | None = None, max_new_tokens: int = 30) -> str:
        """GPT-2 turns the word into a creative image prompt (saved as prompt.txt)."""
        from .text import SamplingSettings

        self._require_run()
        if not isinstance(word, str) or not word.strip():
            raise ValueError("empty word: type a word or phrase to start from, e.g. castle")
        started = time.perf_counter()
        gen = self._use("text")
        seed = self.record["seed"] if seed is None else seed
        result = gen.generate(word.strip(), SamplingSettings(seed=seed, max_new_tokens=max_new_tokens, stop=("\n",),
                                                             repetition_penalty=gen.repetition_penalty))
        text = " ".join(result.text.split())
        self.record.update(word=word.strip(), prompt_source="gpt2", prompt_seed=int(seed))
        self._set_prompt(text)
        self._stage("prompt", started)
        return text

    def use_prompt(self, text: str) -> str:
        """The user's own prompt instead of GPT-2's."""
        self._require_run()
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty prompt: type what the picture should show")
        started = time.perf_counter()
        self.record["prompt_source"] = "given"
        self._set_prompt(" ".join(text.split()))
        self._stage("prompt", started)
        return self.record["prompt"]

    def _set_prompt(self, text: str) -> None:
        self.record["prompt"] = text
        self._save("prompt.txt", lambda p: p.write_text(text + "\n"))

    # ---- 3. the picture ----

    def picture(self, size: tuple[int, int] | None = None, steps: int | None = None, scheduler: str | None = None):
        """Stable Diffusion draws the prompt (image.png, settings in its PNG metadata)."""
        from .sd import PromptTruncatedWarning

        self._require_run()
        if not self.record["prompt"]:
            raise ValueError("no prompt yet: run prompt(word) or use_prompt(text) first")
        started = time.perf_counter()
        sd = self._use("image")
        width, height = size if size else (None, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            result = sd.generate(self.record["prompt"], seed=self.record["seed"], steps=steps, width=width,
                                 height=height, scheduler=scheduler, progress=self.progress,
                                 callback=self._callback("picture"))
        for w in caught:
            if issubclass(w.category, PromptTruncatedWarning):
                self._note(f"the prompt is longer than the text encoder reads: {w.message}")
        s = result.settings
        self.record.update(picture_source="sd", size=[s["width"], s["height"]], steps=s["steps"],
                           scheduler=s["scheduler"], guidance_scale=s["guidance_scale"], picture_timings=result.timings)
        self._save("image.png", lambda p: result.save(p))
        self.image = np.asarray(result.image)
        self.mask = self.edited = None
        self._stage("picture", started)
        return result.image

    def use_picture(self, image, name: str = "upload"):
        """The user's own picture instead of Stable Diffusion's (saved as image.png; replay reads it there)."""
        from PIL import Image

        self._require_run()
        started = time.perf_counter()
        rgb = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
            raise ValueError(f"a picture must be RGB pixels (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
        h, w = rgb.shape[:2]
        self.record.update(picture_source="upload", picture_name=str(name), size=[w, h], steps=None)
        self._save("image.png", lambda p: Image.fromarray(rgb).save(p, format="PNG"))
        self.image = rgb
        self.mask = self.edited = None
        self.found = []
        self._stage("picture", started)
        return Image.fromarray(rgb)

    # ---- 4. candidates ----

    def candidates(self) -> list:
        """SAM's objects, largest first, numbered from 1 on candidates.png."""
        self._require_image()
        started = time.perf_counter()
        sam = self._use("mask")
        sam.set_image(self.image)
        self.found = sam.segment_everything()
        overlay = sam.overlay(self.found)
        self._save("candidates.png", lambda p: overlay.save(p, format="PNG"))
        self.record["candidates"] = [{"number": n, "area": c.area, "box": list(c.bbox), "score": round(c.score, 4)}
                                     for n, c in enumerate(self.found, start=1)]
        self._stage("candidates", started)
        return self.found

    def _require_image(self):
        self._require_run()
        if self.image is None:
            raise ValueError("no picture yet: run picture() first")

    # ---- 5. the mask ----

    def select(self, number: int | None = None, points=None, labels=None, box=None) -> np.ndarray:
        """The object's mask, by candidate number, or points (labels 1 object / 0 not here) and/or a box."""
        from .sam import save_mask_png

        self._require_image()
        if number is not None and (points or box is not None):
            raise ValueError("choose the object by a number OR by points/box, not both")
        started = time.perf_counter()
        if number is not None:
            if isinstance(number, bool) or not isinstance(number, (int, np.integer)):
                raise ValueError(f"candidate number must be a whole number, got {number!r}")
            if not self.found:
                raise ValueError("no candidates were found in this picture: choose by a point x,y or a box x0,y0,x1,y1")
            if not 1 <= number <= len(self.found):
                raise ValueError(f"{number} is not a candidate: the picture has {len(self.found)}, numbered 1 to "
                                 f"{len(self.found)}")
            mask = self.found[number - 1].mask
            pick = {"number": int(number)}
        else:
            if not points and box is None:
                raise ValueError("say which object: a candidate number, points x,y, or a box x0,y0,x1,y1")
            h, w = self.image.shape[:2]
            for x, y in points or []:
                if not (0 <= x < w and 0 <= y < h):
                    raise ValueError(f"point {x:g},{y:g} is outside the picture, which is {w}x{h} px: "
                                     f"x from 0 to {w - 1}, y from 0 to {h - 1}")
            if box is not None:
                x0, y0, x1, y1 = box
                if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                    raise ValueError(f"box {x0:g},{y0:g},{x1:g},{y1:g} is not inside the {w}x{h} px picture: "
                                     f"need 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}")
            sam = self._use("mask")
            sam.set_image(self.image)
            labels = list(labels) if labels is not None else [1] * len(points or [])
            # SAM's advice: three masks for one ambiguous point, one mask for several points or a box
            mask, _, _ = sam.best_mask(points or None, labels or None, box,
                                       multimask=box is None and len(points or []) == 1)
            pick = {}
            if points:
                pick.update(points=[[float(x), float(y)] for x, y in points], labels=[int(v) for v in labels])
            if box is not None:
                pick["box"] = [float(v) for v in box]
        if not mask.any():
            self._note("SAM returned an empty mask for this choice: edits will have nothing to change")
        self.mask = np.asarray(mask, bool)
        self.record["pick"] = pick
        self.record["mask_area"] = int(self.mask.sum())
        self._save("mask.png", lambda p: save_mask_png(self.mask, p))
        from .sam_processing import render_overlay

        overlay = render_overlay(self.image, [self.mask], labels=False)
        self._save("mask-overlay.png", lambda p: overlay.save(p, format="PNG"))
        self._stage("mask", started)
        return self.mask

    # ---- 6-7. the edit ----

    def edit(self, text: str, strength: float | None = None, steps: int | None = None, seed: int | None = None):
        """Parse the user's words (edits.GRAMMAR) and apply them: edited.png and sheet.png."""
        self._require_image()
        edit = ed.parse_edit(text)  # raises EditNotUnderstood listing the grammar
        if self.mask is None:
            raise ValueError("no object chosen yet: run select(...) first")
        started = time.perf_counter()
        rec = edit.describe()
        if edit.generative:
            sd = self._use("image")
            strength = edit.strength if strength is None else strength
            seed = self.record["seed"] if seed is None else seed
            prompt = edit.prompt
            result = sd.edit(self.image, self.mask, prompt, strength=strength, steps=steps or self.record["steps"],
                             seed=seed, scheduler=self.record.get("scheduler"), progress=self.progress,
                             callback=self._callback("edit"))
            out = np.asarray(result.image)
            rec.update(strength=float(strength), steps=result.settings["steps"],
                       denoising_steps=result.settings["denoising_steps"], seed=int(seed),
                       feather_px=result.settings["feather_px"], timings=result.timings)
            for n in result.notes:
                self._note(n)
        else:
            if strength is not None:
                self.log(f"note: --strength applies to generative edits only; {edit.kind} ignores it")
            out = ed.apply_edit(edit, self.image, self.mask)
            rec["feather_px"] = ed.default_feather(self.image.shape[:2])
        from PIL import Image

        self.edited = out
        self.record["edit"] = rec
        self._save("edited.png", lambda p: Image.fromarray(out).save(p, format="PNG"))
        sheet = contact_sheet(self.image, self.mask, out)
        self._save("sheet.png", lambda p: sheet.save(p, format="PNG"))
        self._stage("edit", started)
        return out

    # ---- the end ----

    def finish(self) -> dict:
        self._require_run()
        self.record["finished"] = True
        self._write_record()
        self.log(f"saved {self.run_dir / 'run.json'}")
        return self.record

    def report(self) -> str:
        """Seconds per stage and peak RSS, one line."""
        secs = self.record.get("seconds", {})
        parts = [f"{k} {secs[k]:.2f} s" for k in STAGES if k in secs]
        total = sum(secs.values())
        return "timing: " + " | ".join(parts + [f"total {total:.2f} s", f"peak RSS {peak_rss_mib():.0f} MiB"])

    def command(self) -> str:
        """The scripted command that makes this run again."""
        r = self.record
        if r.get("picture_source") == "upload":  # no flag takes a picture file: replay the run folder
            return f"onnxforge demo --replay {_q(str(self.run_dir / 'run.json'))}"
        cmd = ["onnxforge", "demo"]
        # a prompt the user typed, or one GPT-2 wrote with another seed ("r" in the interactive mode), is
        # given as text: --seed seeds GPT-2 with the run's seed
        if r.get("prompt_source") == "given" or r.get("prompt_seed", r["seed"]) != r["seed"]:
            cmd += ["--prompt", _q(r["prompt"])]
        if r.get("word"):
            cmd += ["--word", _q(r["word"])]
        cmd += ["--seed", str(r["seed"])]
        if r.get("size"):
            cmd += ["--size", f"{r['size'][0]}x{r['size'][1]}", "--steps", str(r["steps"])]
        pick = r.get("pick") or {}
        if "number" in pick:
            cmd += ["--pick", str(pick["number"])]
        for (x, y), lab in zip(pick.get("points", []), pick.get("labels", [])):
            cmd.append(f"--point={'' if lab else '-'}{x:g},{y:g}")
        if "box" in pick:
            cmd += ["--box", ",".join(f"{v:g}" for v in pick["box"])]
        if r.get("edit"):
            cmd += ["--edit", _q(r["edit"]["text"])]
        return " ".join(cmd)


def _q(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _checkerboard(h: int, w: int, cell: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    light = ((yy // cell + xx // cell) % 2 == 0)
    return np.where(light[..., None], 204, 153).astype(np.uint8).repeat(3, axis=2)


def contact_sheet(original: np.ndarray, mask: np.ndarray, edited: np.ndarray, gap: int = 8):
    """original | mask | edited side by side (a cut-out's transparency shown on a checkerboard)."""
    from PIL import Image

    h, w = original.shape[:2]
    if edited.shape[-1] == 4:
        a = edited[..., 3:4].astype(np.float32) / 255
        edited = np.round(edited[..., :3] * a + _checkerboard(h, w) * (1 - a)).astype(np.uint8)
    mask_rgb = np.repeat(np.where(mask, 255, 0).astype(np.uint8)[..., None], 3, axis=2)
    sheet = np.full((h, 3 * w + 2 * gap, 3), 255, np.uint8)
    for i, panel in enumerate((original, mask_rgb, edited)):
        sheet[:, i * (w + gap):i * (w + gap) + w] = panel
    return Image.fromarray(sheet)
