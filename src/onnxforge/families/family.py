"""What a model family hands the shared machinery: one object, registered in families/__init__.py.

Shared code (config, tasks, dodo.py, store, the CLI, the benchmark harness) reads these fields and
never spells a family's name; everything about one family lives in its own package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..config import Recipe
    from ..store import StageContext, StageSpec

# fn(spec, out_dir, ctx) -> record: builds one stage into out_dir (a temporary folder renamed when done).
StageFn = Callable[["StageSpec", Path, "StageContext"], dict]


@dataclass(frozen=True)
class Family:
    name: str  # the recipe's `family:` value
    recipe: type  # the recipe body's pydantic schema (a config.RecipeBody subclass)
    plan: Callable[["Recipe", Path], dict[str, "StageSpec"]]  # recipe -> the publishing stage of each variant
    stages: dict[str, StageFn]  # stage name -> function; a planned stage missing here is an error
    runtime_kind: str  # manifest runtime.kind of its artifacts
    command: str  # the CLI command that runs its artifacts (named in wrong-artifact errors)
    bench: Any = None  # the family's benchmark (a module with the bench.BenchFamily interface), or None
    # Packages whose versions change this family's outputs: part of every stage digest.
    toolchain: tuple[str, ...] = ()
    description: str = ""  # what its artifacts are, e.g. "GPT-2 text generator" (one-line errors, reports)
    # `onnxforge export-layout`: fn(verified Artifact, out folder) -> summary dict, writing the artifact in the folder
    # layout another toolkit's loader reads (SD: optimum's ORTStableDiffusionPipeline), or None.
    export_layout: Callable[[Any, Path], dict] | None = None
    # Without export_layout: how its artifacts load elsewhere, if they do ({dir}: the version folder), for the
    # command's one-line refusal.
    layout_note: str = ""
    extra: dict = field(default_factory=dict)
