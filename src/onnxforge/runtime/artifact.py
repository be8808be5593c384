"""Find, read and verify published artifacts."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "LATEST"  # in a variant folder: the name of its newest version folder
SCHEMA_VERSION = 2  # 2: a top-level "files" list of every file in the version folder


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
                            f"this onnxforge reads {SCHEMA_VERSION}: rebuild the artifact (remove {version_dir}, "
                            "then `doit build`)")
    return manifest


def _check_file(version_dir: Path, rec: dict, owner: str, check_hashes: bool) -> None:
    path = version_dir / rec["file"]
    if not path.is_file():
        raise ArtifactError(f"{path}: file named by the manifest ({owner}) is missing; rebuild the artifact")
    size = path.stat().st_size
    if size != rec["bytes"]:
        raise ArtifactError(f"{path}: {size} bytes, manifest says {rec['bytes']}: the file was changed or truncated; rebuild the artifact")
    if check_hashes and sha256_file(path) != rec["sha256"]:
        raise ArtifactError(f"{path}: sha256 does not match the manifest: the file was changed; rebuild the artifact")


def verify_files(version_dir: Path, manifest: dict, check_hashes: bool = True) -> None:
    """Refuse an artifact whose files do not match the manifest, naming the file.

    Every file of the version folder is checked: the model files of each component and the
    manifest's "files" list (tokenizers, scheduler and other configs, calibration ranges).
    """
    checked = set()
    for name, comp in manifest["components"].items():
        for rec in comp["files"]:
            _check_file(version_dir, rec, f"component {name}", check_hashes)
            checked.add(rec["file"])
    if "files" not in manifest:
        raise ArtifactError(f"{version_dir / MANIFEST}: no \"files\" list, so its tokenizer and config files cannot be "
                            "verified; rebuild the artifact")
    for rec in manifest["files"]:
        if rec["file"] not in checked:
            _check_file(version_dir, rec, "files", check_hashes)


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


def _kind(kind: str | None) -> tuple[str, str | None]:
    """What a runtime kind is and which command reads it, from the family registry (for one-line errors)."""
    from ..families import family_of_kind

    fam = family_of_kind(kind or "")
    return (f"a {fam.description}", f"onnxforge {fam.command}") if fam else (f"of runtime kind {kind!r}", None)


def describe(version_dir: Path, manifest: dict) -> str:
    """'<folder> is a GPT-2 text generator (recipe gpt2-tiny, variant kv, family gpt2)': for one-line errors."""
    info = manifest.get("artifact") or {}
    what, _ = _kind((manifest.get("runtime") or {}).get("kind"))
    return f"{version_dir} is {what} (recipe {info.get('recipe')}, variant {info.get('variant')}, family {info.get('family')})"


def check_kind(version_dir: Path, manifest: dict, expect_kind: str) -> None:
    """One line when an artifact is not of the kind a runtime reads: what it is and which command reads it."""
    kind = (manifest.get("runtime") or {}).get("kind")
    if kind == expect_kind:
        return
    _, command = _kind(kind)
    wanted, wanted_command = _kind(expect_kind)
    it = describe(version_dir, manifest)
    use = f"; use it with `{command} --artifact {version_dir}`" if command else ""
    raise ArtifactError(f"{it}, but {wanted_command or 'this command'} needs {wanted}{use}")


def load(path: "str | Path | Artifact", check_hashes: bool = True, expect_kind: str | None = None) -> Artifact:
    """Read and verify an artifact; with expect_kind, refuse another family's artifact before reading its files."""
    if isinstance(path, Artifact):
        if expect_kind:
            check_kind(path.dir, path.manifest, expect_kind)
        return path
    version_dir = resolve(path)
    manifest = read_manifest(version_dir)
    if expect_kind:
        check_kind(version_dir, manifest, expect_kind)
    verify_files(version_dir, manifest, check_hashes=check_hashes)
    return Artifact(version_dir, manifest)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
