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
