"""The artifact store: content-addressed stages, atomic publishing, manifests.

Layout under the artifacts root:
    <recipe>/.stages/<stage>-<variant>-<digest>/   intermediate outputs (stage.json last)
    <recipe>/<variant>/<version>/                  published artifact (manifest.json last)
    <recipe>/<variant>/LATEST                      name of the newest published version
A stage's digest covers its parameters, its upstream digests and the toolchain
versions, so the same inputs give the same folder and any change a new one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from .runtime.artifact import LATEST, MANIFEST, SCHEMA_VERSION, sha256_file, write_json_atomic

STAGE_MARKER = "stage.json"


class ValidationFailed(RuntimeError):
    """An artifact that does not match its reference: the build stops, nothing is published."""

# Packages whose versions change every family's outputs; each family adds its own (Family.toolchain).
TOOLCHAIN_PACKAGES = ("onnxforge", "numpy", "onnx", "onnxruntime")


@cache
def toolchain_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    out = {}
    for pkg in dict.fromkeys(TOOLCHAIN_PACKAGES + tuple(extra)):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


class StageParams(BaseModel):
    """A stage's typed, frozen parameters, handed from the family's planner to its stage function (any
    frozen pydantic model will do, e.g. a recipe section). The stage digest is computed from their JSON dump."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PublishParams(StageParams):
    runtime: dict  # the recipe's runtime defaults, in the manifest runtime block's shape


def digest_of(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


@dataclass(frozen=True, eq=False)
class StageSpec:
    """One build step of one artifact, e.g. export of gpt2-tiny's kv variant."""

    stage: str  # a name in the family's `stages` (source, export, quantize, validate, publish, ...)
    recipe: str
    variant: str | None
    params: BaseModel  # the stage's typed parameters (a StageParams, or a frozen recipe section)
    family: str  # the registry entry whose `stages[stage]` builds it
    builder: str  # digest of the family's build code: editing it rebuilds
    upstream: tuple["StageSpec", ...] = ()
    publishes: bool = False  # the last stage of a variant publishes the artifact
    doc: str = ""
    extra: dict = field(default_factory=dict)  # recipe context the function needs but the digest doesn't

    @property
    def digest(self) -> str:
        return digest_of({
            "stage": self.stage,
            "params": self.params.model_dump(mode="json"),
            "builder": self.builder,
            "upstream": [u.digest for u in self.upstream],
            "toolchain": toolchain_versions(self.toolchain),
        })

    @property
    def toolchain(self) -> tuple[str, ...]:
        from .families import FAMILIES

        return FAMILIES[self.family].toolchain

    @property
    def task_name(self) -> str:
        return f"{self.recipe}-{self.variant}" if self.variant else self.recipe

    def out_dir(self, root: Path) -> Path:
        if self.publishes:
            return root / self.recipe / self.variant / self.digest
        return root / self.recipe / ".stages" / f"{self.stage}-{self.variant or 'all'}-{self.digest}"

    def target(self, root: Path) -> Path:
        return self.out_dir(root) / (MANIFEST if self.publishes else STAGE_MARKER)


@dataclass
class StageContext:
    root: Path
    project_dir: Path  # where recipes/ and calibration/ live

    def upstream_dir(self, spec: StageSpec, stage: str) -> Path:
        up = find_upstream(spec, stage)
        return up.out_dir(self.root)

    def upstream_record(self, spec: StageSpec, stage: str) -> dict:
        return json.loads(find_upstream(spec, stage).target(self.root).read_text())


def find_upstream(spec: StageSpec, stage: str) -> StageSpec:
    for up in spec.upstream:
        if up.stage == stage:
            return up
    for up in spec.upstream:
        try:
            return find_upstream(up, stage)
        except KeyError:
            pass
    raise KeyError(f"{spec.stage}:{spec.task_name} has no upstream stage {stage!r}")


@contextmanager
def atomic_dir(final: Path):
    """Build into a temporary folder beside `final`, then rename it into place.

    A crash or Ctrl-C leaves only a `.tmp-*` folder (removed by the next build),
    never a folder that looks complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        readable_by_all(tmp)
        if final.exists():  # a half-published leftover without its marker
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def readable_by_all(folder: Path) -> None:
    """Files 0644, folders 0755, whatever wrote them: the exporters write external data (*.onnx.data)
    0600, which other users of a shared artifact could not read."""
    uid = os.getuid()
    for p in [folder, *folder.rglob("*")]:
        st = p.lstat()
        if st.st_uid != uid or p.is_symlink():  # e.g. a hard link into another user's cache: not ours to change
            continue
        mode = 0o755 if p.is_dir() else 0o644
        if st.st_mode & 0o7777 != mode:
            os.chmod(p, mode)


def clean_stale_tmp(parent: Path) -> None:
    """Remove temporary folders left by killed builds (their owner process is gone)."""
    if not parent.is_dir():
        return
    for tmp in parent.glob(".tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def link_or_copy(src: Path, dst: Path, link_data: bool = False) -> None:
    """Hard-link a file into a new artifact (no second copy on disk); copy across devices.

    ONNX external data (*.data) is copied unless link_data: onnx >= 1.23 refuses to read external data
    through a file with more than one hard link (a hard-link attack guard), and later stages (quantize)
    read their upstream's external data with onnx. Publishing links it (only onnxruntime reads a
    published artifact, and it has no such guard): a multi-GB UNet is not stored twice.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.name.endswith(".data") and not link_data:
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def file_record(path: Path, base: Path) -> dict:
    return {"file": str(path.relative_to(base)), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def onnx_files(model_path: Path, model=None) -> list[Path]:
    """An ONNX file and the external-data files it names."""
    import onnx

    model = model if model is not None else onnx.load(str(model_path), load_external_data=False)
    files = [model_path]
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and (model_path.parent / entry.value) not in files:
                files.append(model_path.parent / entry.value)
    return files


def onnx_component(model_path: Path, base: Path) -> dict:
    """Files (model + external data), inputs and outputs with dtypes and symbolic shapes."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    files = onnx_files(model_path, model)

    def describe(value):
        t = value.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    init_names = {i.name for i in model.graph.initializer}
    return {
        "file": str(model_path.relative_to(base)),
        "files": [file_record(p, base) for p in files],
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": [describe(v) for v in model.graph.input if v.name not in init_names],
        "outputs": [describe(v) for v in model.graph.output],
    }


def published_files(out: Path) -> list[dict]:
    """Size and sha256 of every file of a version folder except the manifest: all the runtime reads is verified."""
    return [file_record(p, out) for p in sorted(out.rglob("*")) if p.is_file() and p != out / MANIFEST]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stage_function(spec: StageSpec) -> Callable:
    """The family's function for this stage; a stage the family does not define is an error, never skipped."""
    from .families import FAMILIES

    family = FAMILIES.get(spec.family)
    if family is None:
        raise KeyError(f"{spec.stage}:{spec.task_name}: no family {spec.family!r} is registered")
    fn = family.stages.get(spec.stage)
    if fn is None:
        raise KeyError(f"{spec.stage}:{spec.task_name}: family {spec.family!r} plans a {spec.stage!r} stage but defines "
                       f"no such stage (it has {', '.join(family.stages)})")
    return fn


def publish_stage(spec: StageSpec, out: Path, ctx: "StageContext") -> dict:
    """Publish a validated artifact: link its files and add the recipe's runtime defaults.

    Shared by every family. Validation happens upstream, so changing a runtime default (a prompt template,
    default steps) makes a new version without validating again.
    """
    src = ctx.upstream_dir(spec, "validate")
    record = ctx.upstream_record(spec, "validate")
    for f in sorted(src.rglob("*")):
        if f.is_file() and f.name != STAGE_MARKER:
            link_or_copy(f, out / f.relative_to(src), link_data=True)
    return {"components": record["components"], "validation": record["validation"],
            "runtime": {**record["runtime"], **spec.params.runtime}}


def stage_chain(spec: StageSpec) -> list[StageSpec]:
    """All stages this one depends on, upstream first, each once."""
    seen: dict[str, StageSpec] = {}

    def walk(s):
        for u in s.upstream:
            walk(u)
        seen.setdefault(s.stage + (s.variant or "") + s.digest, s)

    walk(spec)
    return list(seen.values())


class StageProcessFailed(RuntimeError):
    """A stage's own process failed without a one-line reason (its traceback is printed above) or was killed."""


def run_stage(spec: StageSpec, ctx: StageContext) -> None:
    """Run one stage into its content-addressed folder, atomically.

    Every stage runs in a fresh Python process (onnxforge.stage_process): the memory an earlier stage
    held or fragmented goes back to the system when its process exits, so one build's peak is its
    largest stage's, not the sum of what accumulated in doit's process (issue 10, item 17), and each
    stage's recorded peak RSS is its own. Publish too: reading a single-file model's graph for the
    manifest loads its weights, which doit's process would keep through the next stages.
    """
    target = spec.target(ctx.root)
    out = spec.out_dir(ctx.root)
    if not target.is_file():
        _build_stage_in_own_process(spec, ctx)
    if spec.publishes:  # also when an older version becomes current again
        (out.parent / f".{LATEST}.tmp").write_text(out.name + "\n")
        os.replace(out.parent / f".{LATEST}.tmp", out.parent / LATEST)


def _quiet_libraries() -> None:
    """The exporters talk a lot (deprecations, skipped torchvision ops); keep the build log readable."""
    import logging
    import warnings

    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _build_stage_in_own_process(spec: StageSpec, ctx: StageContext) -> None:
    """Run `python -m onnxforge.stage_process` on this stage and wait; its failure is raised here.

    An expected failure (a ValidationFailed, a missing file, ...) comes back pickled and is raised as it
    is, so the caller reports it in one line as before; anything else was printed with its traceback by
    the child and becomes a StageProcessFailed.
    """
    import pickle
    import signal
    import subprocess
    import tempfile
    import threading

    name = f"{spec.stage}:{spec.task_name}"
    with tempfile.TemporaryDirectory(prefix="onnxforge-stage-") as tmp:
        job = Path(tmp) / "job.pickle"
        job.write_bytes(pickle.dumps((spec, ctx)))
        sys.stdout.flush()
        sys.stderr.flush()
        proc = subprocess.Popen([sys.executable, "-m", "onnxforge.stage_process", str(job)])

        def stop_child(signum, frame):
            # A SIGTERM sent to this process alone (kill PID) would otherwise end it and leave the stage's
            # process running on (an hour of training, unseen): pass it on, then stop as Ctrl-C does.
            proc.send_signal(signum)
            raise SystemExit(128 + signum)

        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, stop_child)
        try:
            rc = proc.wait()
        except BaseException:  # Ctrl-C reaches the child too: give it time to remove its temporary folder
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        error = job.with_suffix(".error")
        if rc == 0:
            return
        if error.is_file():
            raise pickle.loads(error.read_bytes())
        if rc < 0:
            sig = signal.Signals(-rc).name
            hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -rc == signal.SIGKILL else ""
            raise StageProcessFailed(f"{name}: its process was killed by {sig}{hint}")
        raise StageProcessFailed(f"{name}: its process exited with code {rc} (its traceback is printed above)")


def _build_stage(spec: StageSpec, ctx: StageContext, out: Path, own_process: bool = False) -> None:
    """Run the family's stage function into a temporary folder, record time and peak RSS, publish atomically.

    own_process: this process runs only this stage (onnxforge.stage_process), so the kernel's lifetime
    maximum RSS (exact, not sampled) belongs to the stage and counts too.
    """
    import contextlib
    import io
    import time

    _quiet_libraries()
    clean_stale_tmp(out.parent)
    started = time.perf_counter()
    with atomic_dir(out) as tmp:
        chatter = io.StringIO()  # library prints (e.g. torch.onnx's progress) go here, shown only on failure
        try:
            with contextlib.redirect_stdout(chatter), peak_rss(lifetime=own_process) as peak:
                record = stage_function(spec)(spec, tmp, ctx) or {}
        except BaseException:
            sys.stdout.write(chatter.getvalue()[-4000:])
            raise
        seconds = round(time.perf_counter() - started, 1)
        record.setdefault("recorded", {}).update(seconds=seconds, peak_rss_mib=round(peak[0] / 2**20))
        if spec.publishes:
            manifest = build_manifest(spec, ctx, tmp, record)
            write_json_atomic(tmp / MANIFEST, manifest)  # last: its presence means complete
        else:
            write_json_atomic(tmp / STAGE_MARKER, {"stage": spec.stage, "digest": spec.digest,
                                                   "params": spec.params.model_dump(mode="json"),
                                                   "process": {"pid": os.getpid(), "own": own_process}, **record})
    print(f"   {spec.stage}:{spec.task_name} done in {seconds:.1f} s, peak RSS {peak[0] / 2**30:.2f} GiB -> {out}")


def _lifetime_peak_rss() -> int:
    """getrusage's maximum RSS of this process and of its waited-for children, in bytes (Linux: KiB units)."""
    import resource

    kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return kib * 1024 if sys.platform != "darwin" else kib


@contextmanager
def peak_rss(interval: float = 0.05, lifetime: bool = False):
    """The peak resident memory while the block runs, in bytes (`with peak_rss() as p: ...; p[0]`): this
    process plus any processes it starts, sampled every `interval` s (spikes shorter than that can be
    missed). lifetime: also the kernel's exact maximum for this process's whole life, right when it runs
    one stage only."""
    import threading

    import psutil

    proc = psutil.Process()

    def rss() -> int:
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # it ended between the listing and the reading
                pass
        return total

    peak = [rss()]
    stop = threading.Event()

    def sample():
        while not stop.wait(interval):
            peak[0] = max(peak[0], rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss(), _lifetime_peak_rss() if lifetime else 0)


def build_manifest(spec: StageSpec, ctx: StageContext, out: Path, record: dict) -> dict:
    """Assemble manifest.json from the stage chain's records and the publishing stage's result."""
    stages = []
    source = {}
    for s in stage_chain(spec):
        if s is spec:
            rec = record
        else:
            rec = json.loads(s.target(ctx.root).read_text())
        entry = {"stage": s.stage, "digest": s.digest, "params": s.params.model_dump(mode="json")}
        entry.update(rec.get("recorded", {}))
        stages.append(entry)
        if s.stage == "source":
            source = rec.get("source", {})
    components = {name: onnx_component(out / path, out) for name, path in record["components"].items()}
    files = published_files(out)
    return {
        "schema_version": SCHEMA_VERSION,
        "artifact": {
            "recipe": spec.recipe,
            "variant": spec.variant,
            "version": spec.digest,  # digest of the inputs (recipe stages, upstream, toolchain, builder code)
            # digest of the outputs: builds of one version on two CPUs can differ where float kernels feed a
            # result (calibrated int8 ranges); the same version with another content_digest shows it.
            "content_digest": digest_of([[f["file"], f["sha256"]] for f in files], n=16),
            "family": spec.family,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "bytes_on_disk": dir_bytes(out),
        },
        "recipe": {"name": spec.recipe, "file": spec.extra.get("recipe_file"), "digest": spec.extra.get("recipe_digest")},
        "source": source,
        "toolchain": toolchain_versions(spec.toolchain),
        "stages": stages,
        "components": components,
        "files": files,
        "validation": record.get("validation", {}),
        "benchmark": None,
        "runtime": record["runtime"],
    }


def latest_version(variant_dir: Path) -> Path | None:
    latest = variant_dir / LATEST
    if latest.is_file():
        return variant_dir / latest.read_text().strip()
    return None
