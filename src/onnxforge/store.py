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
import importlib
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

from .runtime.artifact import LATEST, MANIFEST, SCHEMA_VERSION, sha256_file, write_json_atomic

STAGE_MARKER = "stage.json"


class ValidationFailed(RuntimeError):
    """An artifact that does not match its reference: the build stops, nothing is published."""

TOOLCHAIN_PACKAGES = ("onnxforge", "torch", "transformers", "onnx", "onnxruntime", "optimum", "torch-pruning", "tokenizers")


@cache
def toolchain_versions() -> dict[str, str]:
    out = {}
    for pkg in TOOLCHAIN_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def digest_of(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


@dataclass(frozen=True, eq=False)
class StageSpec:
    """One build step of one artifact, e.g. export of gpt2-tiny's kv variant."""

    stage: str  # source | prune | export | quantize | validate
    recipe: str
    variant: str | None
    params: dict
    fn: str  # "module:function" run as fn(spec, out_dir, ctx); imported lazily so `doit list` stays fast
    upstream: tuple["StageSpec", ...] = ()
    publishes: bool = False  # the last stage of a variant publishes the artifact
    doc: str = ""
    extra: dict = field(default_factory=dict)  # recipe context the function needs but the digest doesn't

    @property
    def digest(self) -> str:
        return digest_of({
            "stage": self.stage,
            "params": self.params,
            "upstream": [u.digest for u in self.upstream],
            "toolchain": toolchain_versions(),
        })

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


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a file into a new artifact (no second copy on disk); copy across devices.

    ONNX external data (*.data) is always copied: onnx >= 1.23 refuses to read external data through a
    file with more than one hard link (a hard-link attack guard), and later stages (quantize) read
    their upstream's external data.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.name.endswith(".data"):
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def file_record(path: Path, base: Path) -> dict:
    return {"file": str(path.relative_to(base)), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def onnx_component(model_path: Path, base: Path) -> dict:
    """Files (model + external data), inputs and outputs with dtypes and symbolic shapes."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    files = [model_path]
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                loc = model_path.parent / entry.value
                if loc not in files:
                    files.append(loc)

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


def _call(fn_path: str) -> Callable:
    module, name = fn_path.split(":")
    return getattr(importlib.import_module(module), name)


def stage_chain(spec: StageSpec) -> list[StageSpec]:
    """All stages this one depends on, upstream first, each once."""
    seen: dict[str, StageSpec] = {}

    def walk(s):
        for u in s.upstream:
            walk(u)
        seen.setdefault(s.stage + (s.variant or "") + s.digest, s)

    walk(spec)
    return list(seen.values())


def run_stage(spec: StageSpec, ctx: StageContext) -> None:
    """Run one stage into its content-addressed folder, atomically."""
    target = spec.target(ctx.root)
    out = spec.out_dir(ctx.root)
    if not target.is_file():
        _build_stage(spec, ctx, out)
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


def _build_stage(spec: StageSpec, ctx: StageContext, out: Path) -> None:
    import contextlib
    import io
    import time

    _quiet_libraries()
    clean_stale_tmp(out.parent)
    started = time.perf_counter()
    with atomic_dir(out) as tmp:
        chatter = io.StringIO()  # library prints (e.g. torch.onnx's progress) go here, shown only on failure
        try:
            with contextlib.redirect_stdout(chatter):
                record = _call(spec.fn)(spec, tmp, ctx) or {}
        except BaseException:
            sys.stdout.write(chatter.getvalue()[-4000:])
            raise
        if spec.publishes:
            manifest = build_manifest(spec, ctx, tmp, record)
            write_json_atomic(tmp / MANIFEST, manifest)  # last: its presence means complete
        else:
            write_json_atomic(tmp / STAGE_MARKER, {"stage": spec.stage, "digest": spec.digest,
                                                   "params": spec.params, **record})
    print(f"   {spec.stage}:{spec.task_name} done in {time.perf_counter() - started:.1f} s -> {out}")


def build_manifest(spec: StageSpec, ctx: StageContext, out: Path, record: dict) -> dict:
    """Assemble manifest.json from the stage chain's records and the publishing stage's result."""
    stages = []
    source = {}
    for s in stage_chain(spec):
        if s is spec:
            rec = record
        else:
            rec = json.loads(s.target(ctx.root).read_text())
        entry = {"stage": s.stage, "digest": s.digest, "params": s.params}
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
            "family": spec.extra.get("family"),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "bytes_on_disk": dir_bytes(out),
        },
        "recipe": {"name": spec.recipe, "file": spec.extra.get("recipe_file"), "digest": spec.extra.get("recipe_digest")},
        "source": source,
        "toolchain": toolchain_versions(),
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
