"""Shared fixtures: the tiny GPT-2 recipe built once per test session, in a tmp project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Project:
    dir: Path

    @property
    def recipes(self) -> Path:
        return self.dir / "recipes"

    @property
    def artifacts(self) -> Path:
        return self.dir / "artifacts"

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env.update(ONNXFORGE_PROJECT=str(self.dir), ONNXFORGE_RECIPES=str(self.recipes),
                   ONNXFORGE_ARTIFACTS=str(self.artifacts), PYTHONWARNINGS="ignore",
                   # The machine's Hugging Face cache must not change a build (issue 10, item 22: a cached
                   # CLIP model turned CLIP scores on); tests that want a cache pass their own.
                   HF_HOME=str(self.dir / ".hf-home"), HF_HUB_CACHE=str(self.dir / ".hf-home" / "hub"),
                   HF_HUB_OFFLINE="1")
        env.update(extra)
        return env

    def doit(self, *args, check=True, **env_extra) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "--dir", str(self.dir), *args],
                              capture_output=True, text=True, env=self.env(**env_extra))
        if check and proc.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def variant(self, name: str, recipe: str = "gpt2-tiny") -> Path:
        from onnxforge.runtime.artifact import resolve

        return resolve(self.artifacts / recipe / name)


def new_project(root: Path, recipe_files: dict[str, str] | None = None) -> Project:
    """A project folder with the repo's calibration data and the given recipes (default: the tiny one)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "calibration", root / "calibration")
    (root / "pocket").symlink_to(REPO / "pocket", target_is_directory=True)  # committed pocket weights (read only)
    (root / "recipes" / "configs").mkdir(parents=True)
    for cfg in (REPO / "recipes" / "configs").glob("*.json"):
        shutil.copy(cfg, root / "recipes" / "configs" / cfg.name)
    if recipe_files is None:
        shutil.copy(REPO / "recipes" / "gpt2-tiny.yaml", root / "recipes" / "gpt2-tiny.yaml")
    else:
        for name, text in recipe_files.items():
            (root / "recipes" / f"{name}.yaml").write_text(text)
    return Project(root)


def built_project(tmp_path_factory, name: str, recipes: list[str]) -> Project:
    """The one factory for the tiny projects: the repo's named recipes, built once with `doit build`."""
    texts = {r: (REPO / "recipes" / f"{r}.yaml").read_text() for r in recipes}
    project = new_project(tmp_path_factory.mktemp(name), texts)
    project.doit("build")
    return project


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Project:
    """The shipped gpt2-tiny recipe (all four variants)."""
    return built_project(tmp_path_factory, "tiny-project", ["gpt2-tiny"])


@pytest.fixture(scope="session")
def sam_tiny(tmp_path_factory) -> Project:
    """The shipped sam-tiny recipe (fp32 and int8)."""
    return built_project(tmp_path_factory, "sam-project", ["sam-tiny"])


@pytest.fixture(scope="session")
def sam2_tiny(tmp_path_factory) -> Project:
    """The sam2-tiny recipe (fp32 and int8 at 128 px, fp32 at 64 px); not in the default build, so built by name."""
    project = new_project(tmp_path_factory.mktemp("sam2-project"),
                          {"sam2-tiny": (REPO / "recipes" / "sam2-tiny.yaml").read_text()})
    project.doit("build", "recipes=sam2-tiny")
    return project


@pytest.fixture(scope="session")
def sd_tiny(tmp_path_factory) -> Project:
    """The shipped sd-tiny recipe (fp32, int8 static, int8-dynamic)."""
    return built_project(tmp_path_factory, "sd-project", ["sd-tiny"])


@pytest.fixture(scope="session")
def sd_tiny_lcm(tmp_path_factory) -> Project:
    """The shipped sd-tiny-lcm recipe: the fast path (fused LoRA, one-pass UNet, LCM, TAESD)."""
    return built_project(tmp_path_factory, "sd-lcm-project", ["sd-tiny-lcm"])


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxforge.cli", *args], capture_output=True, text=True,
                          env=env or dict(os.environ, PYTHONWARNINGS="ignore"))


@pytest.fixture(scope="session")
def demo_artifacts(tmp_path_factory, tiny, sam_tiny, sd_tiny, sd_tiny_lcm) -> Path:
    """One artifacts root holding the default builds gpt2-tiny, sd-tiny, sd-tiny-lcm and sam-tiny (links to the
    builds above, so nothing is built twice), as `doit build` makes it for the demo: the demo takes the fast
    path (sd-tiny-lcm) by default; `--image-model sd-tiny` the classic one."""
    root = tmp_path_factory.mktemp("demo-project") / "artifacts"
    root.mkdir()
    for project, recipe in ((tiny, "gpt2-tiny"), (sd_tiny, "sd-tiny"), (sd_tiny_lcm, "sd-tiny-lcm"),
                            (sam_tiny, "sam-tiny")):
        (root / recipe).symlink_to(project.artifacts / recipe, target_is_directory=True)
    return root


POCKET_DEFAULTS = ["gpt2-pocket", "sd-pocket", "sam-pocket"]  # the default recipes that read committed pocket weights


@pytest.fixture(scope="session")
def pocket_defaults(tmp_path_factory) -> Project:
    """The default pocket recipes, built from the committed weights under pocket/ (no training)."""
    return built_project(tmp_path_factory, "pocket-defaults", POCKET_DEFAULTS)


@pytest.fixture(scope="session")
def default_artifacts(tmp_path_factory, demo_artifacts, pocket_defaults) -> Path:
    """Every default recipe in one artifacts root, as after `make demo` (links, nothing built twice)."""
    root = tmp_path_factory.mktemp("default-project") / "artifacts"
    root.mkdir()
    for entry in demo_artifacts.iterdir():
        (root / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
    for recipe in POCKET_DEFAULTS:
        (root / recipe).symlink_to(pocket_defaults.artifacts / recipe, target_is_directory=True)
    return root
