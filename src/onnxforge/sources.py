"""Where weights come from: the Hugging Face cache (hub), a local folder (path)."""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


class SourceError(RuntimeError):
    """A model source that cannot be reached, with what to do about it."""


def hub_snapshot(repo: str, revision: str, allow_patterns: list[str]) -> Path:
    """The local snapshot folder of repo@revision, downloading it if the Hub is reachable.

    Looks in the cache first so that an offline machine with the files never
    touches the network; an offline machine without them gets one clear line.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    how = (f"fetch it on a connected machine with `huggingface-cli download {repo} --revision {revision}` and copy "
           f"the HF cache (~/.cache/huggingface) here, or point the recipe's source at a local folder with `path:`")
    import os

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise SourceError(f"{repo}@{revision[:12]} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {how}")
    # Fail fast instead of retrying for minutes when there is no network.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns))
    except Exception as exc:  # network errors come in many types; all mean the same to the user
        raise SourceError(f"{repo}@{revision[:12]} is not in the Hugging Face cache and the Hub cannot be reached "
                          f"({type(exc).__name__}): {how}") from None


def local_folder(path: str | Path, project_dir: Path, required: tuple[str, ...] = ("config.json",)) -> Path:
    folder = Path(path)
    if not folder.is_absolute():
        folder = project_dir / folder
    if not folder.is_dir():
        raise SourceError(f"source.path: {folder} is not a folder; give a local folder laid out like the Hub repo")
    verify_pocket_folder(folder)  # committed pocket weights: name the changed or missing file first
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise SourceError(f"source.path: {folder} lacks {', '.join(missing)}; it must be laid out like the Hub repo")
    if not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        raise SourceError(f"source.path: {folder} has no weights (*.safetensors or *.bin)")
    return folder


def folder_fingerprint(folder: Path) -> list:
    """Cheap identity of a local folder's files (name, size, mtime) for the version digest."""
    if not folder.is_dir():
        return []
    return sorted((str(p.relative_to(folder)), p.stat().st_size, int(p.stat().st_mtime))
                  for p in folder.rglob("*") if p.is_file())


def weights_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for pattern in WEIGHT_PATTERNS:
        for p in sorted(folder.glob(pattern)):
            h.update(p.name.encode())
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
    return h.hexdigest()


# ---- pocket folders: trained weights committed to the repository (issue 16) ---------------------

POCKET_MANIFEST = "pocket.json"


def write_pocket_manifest(folder: Path, command: str, training: dict) -> dict:
    """pocket.json: every file's size and sha256, and the command that reproduces the folder."""
    import json

    from .runtime.artifact import sha256_file

    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != POCKET_MANIFEST}
    manifest = {"command": command, "training": training, "files": files}
    (folder / POCKET_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_pocket_folder(folder: Path) -> dict | None:
    """A folder with a pocket.json must hold exactly its files, byte for byte; None for any other folder.

    Committed weights that were edited, truncated or half-replaced are refused here, naming the file and
    the command that rebuilds them, before any stage reads a tensor of them.
    """
    import json

    from .runtime.artifact import sha256_file

    manifest_path = folder / POCKET_MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        files, command = manifest["files"], manifest["command"]
    except (ValueError, KeyError, TypeError):
        raise SourceError(f"{manifest_path}: not a pocket manifest (unreadable JSON or no files/command); "
                          f"restore it with `git checkout -- {folder}`") from None
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            raise SourceError(f"{path}: missing from the pocket folder (its {POCKET_MANIFEST} lists it); restore it "
                              f"with `git checkout -- {folder}` or rebuild with `{command}`")
        if path.stat().st_size != want["bytes"] or sha256_file(path) != want["sha256"]:
            raise SourceError(f"{path}: sha256 does not match its {POCKET_MANIFEST}; restore it with "
                              f"`git checkout -- {folder}` or rebuild with `{command}`")
    extra = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and p.name != POCKET_MANIFEST and str(p.relative_to(folder)) not in files)
    if extra:
        raise SourceError(f"{folder / extra[0]}: not listed in the pocket folder's {POCKET_MANIFEST}; remove it or "
                          f"rebuild with `{command}`")
    return manifest


def pocket_training_source(project_dir: Path, path: str) -> dict:
    """The source record of the training that made a pocket folder ({} for any other folder): what the plan
    needs to hold committed weights to their world's oracle. Not verified here (the source stage does that)."""
    import json

    folder = Path(path) if Path(path).is_absolute() else project_dir / path
    try:
        return json.loads((folder / POCKET_MANIFEST).read_text())["training"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
