"""Find, read and verify published artifacts."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "LATEST"  # in a variant folder: the name of its newest version folder
SCHEMA_VERSION = 1


class ArtifactError(RuntimeError):
    """An artifact that cannot be used, with a one-line reason."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve(path: str | Path) -> Path:
    """A version folder, or a variant folder whose LATEST names one."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        version = path / latest.read_text().strip()
        if (version / MANIFEST).is_file():
            return version
        raise ArtifactError(f"{latest} names {version.name}, which has no {MANIFEST}: rebuild with `doit build`")
    if path.is_dir():
        raise ArtifactError(f"{path} holds no {MANIFEST} and no {LATEST}: pass a built variant folder "
                            "(e.g. artifacts/gpt2-tiny/kv) or build it with `doit build`")
    raise ArtifactError(f"no artifact at {path}: build it with `doit build` (see `doit list`)")


def read_manifest(version_dir: Path) -> dict:
    try:
        manifest = json.loads((version_dir / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{version_dir / MANIFEST} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{version_dir / MANIFEST}: schema_version {manifest.get('schema_version')!r}, "
                            f"this onnxforge reads {SCHEMA_VERSION}: rebuild the artifact")
    return manifest


def verify_files(version_dir: Path, manifest: dict, check_hashes: bool = True) -> None:
    """Refuse an artifact whose files do not match the manifest, naming the file."""
    for name, comp in manifest["components"].items():
        for rec in comp["files"]:
            path = version_dir / rec["file"]
            if not path.is_file():
                raise ArtifactError(f"{path}: file named by the manifest (component {name}) is missing; rebuild the artifact")
            size = path.stat().st_size
            if size != rec["bytes"]:
                raise ArtifactError(f"{path}: {size} bytes, manifest says {rec['bytes']}: the file was changed or truncated; rebuild the artifact")
            if check_hashes and sha256_file(path) != rec["sha256"]:
                raise ArtifactError(f"{path}: sha256 does not match the manifest: the file was changed; rebuild the artifact")


@dataclass
class Artifact:
    dir: Path
    manifest: dict

    @property
    def runtime(self) -> dict:
        return self.manifest["runtime"]

    def component_path(self, name: str) -> Path:
        return self.dir / self.manifest["components"][name]["file"]

    def session(self, name: str, threads: int | None = None, low_memory: bool = False):
        """An onnxruntime session for one component, checked against the manifest."""
        comp = self.manifest["components"][name]
        sess = make_session(self.component_path(name), threads=threads, low_memory=low_memory)
        expected = [i["name"] for i in comp["inputs"]]
        actual = [i.name for i in sess.get_inputs()]
        if expected != actual:
            raise ArtifactError(f"{self.component_path(name)}: inputs {actual} do not match the manifest's {expected}")
        return sess


def make_session(path: Path, threads: int | None = None, low_memory: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # The arena keeps freed buffers; on these CPUs it raises peak RSS with no speed gain.
    opts.enable_cpu_mem_arena = not low_memory
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def load(path: str | Path, check_hashes: bool = True) -> Artifact:
    version_dir = resolve(path)
    manifest = read_manifest(version_dir)
    verify_files(version_dir, manifest, check_hashes=check_hashes)
    return Artifact(version_dir, manifest)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
