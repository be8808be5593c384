"""doit task creators: one task per stage per artifact, named `<stage>:<recipe>-<variant>`."""

from __future__ import annotations

import os
from pathlib import Path

from doit.tools import config_changed

from .config import Recipe
from .store import StageContext, StageSpec, run_stage

STAGE_ORDER = ("source", "prune", "export", "calibrate", "quantize", "validate")


def project_paths() -> tuple[Path, Path, Path]:
    """(project dir, recipes dir, artifacts root); the env vars let tests build in a tmp dir."""
    project = Path(os.environ.get("ONNXFORGE_PROJECT", Path.cwd())).resolve()
    recipes = Path(os.environ.get("ONNXFORGE_RECIPES", project / "recipes")).resolve()
    artifacts = Path(os.environ.get("ONNXFORGE_ARTIFACTS", project / "artifacts")).resolve()
    return project, recipes, artifacts


def plan_all(recipes: dict[str, Recipe], project_dir: Path) -> dict[str, dict[str, StageSpec]]:
    from .models import gpt2, sam, sd

    planners = {"gpt2": gpt2.plan, "sam": sam.plan, "sd": sd.plan}
    return {name: planners[r.body.family](r, project_dir) for name, r in recipes.items()}


def _run(spec: StageSpec, ctx: StageContext):
    """Expected failures become one clear line in doit's report, not a traceback."""
    from doit.exceptions import TaskFailed

    from .config import RecipeError
    from .sources import SourceError
    from .store import ValidationFailed

    try:
        run_stage(spec, ctx)
    except (SourceError, ValidationFailed, RecipeError, FileNotFoundError) as exc:
        return TaskFailed(f"{spec.stage}:{spec.task_name}: {exc}")


def stage_tasks(plans: dict[str, dict[str, StageSpec]], ctx: StageContext):
    """Yield doit task dicts, grouped by stage so `doit list` reads as the pipeline."""
    seen: dict[str, StageSpec] = {}

    def collect(spec: StageSpec):
        for u in spec.upstream:
            collect(u)
        seen.setdefault(f"{spec.stage}:{spec.task_name}", spec)

    for variants in plans.values():
        for spec in variants.values():
            collect(spec)
    for stage in STAGE_ORDER:
        subtasks = [(name, spec) for name, spec in seen.items() if spec.stage == stage]
        if not subtasks:
            continue
        yield {"basename": stage, "name": None, "doc": f"{stage} stage of each artifact"}
        for name, spec in subtasks:
            yield {
                "basename": stage,
                "name": spec.task_name,
                "doc": spec.doc,
                "actions": [(_run, [spec, ctx])],
                "file_dep": [str(u.target(ctx.root)) for u in spec.upstream],
                "targets": [str(spec.target(ctx.root))],
                "task_dep": [f"{u.stage}:{u.task_name}" for u in spec.upstream],
                "uptodate": [config_changed(spec.digest)],
                "verbosity": 2,
            }


def publish_task_names(plans, recipe_names) -> list[str]:
    return [f"validate:{plans[r][v].task_name}" for r in recipe_names for v in plans[r]]


def bench_task(plans: dict[str, dict[str, StageSpec]], ctx: StageContext):
    """`bench:<recipe>`: all published variants of a recipe measured in one run."""
    from .store import digest_of

    yield {"basename": "bench", "name": None, "doc": "benchmark a recipe's variants (not part of build)"}
    for recipe, variants in plans.items():
        versions = {v: s.digest for v, s in variants.items()}
        out = ctx.root / recipe / "bench" / digest_of(versions)

        def run(variants=variants, out=out):
            family = next(iter(variants.values())).extra["family"]
            if family == "sam":
                from .bench_sam import bench_variants
            elif family == "sd":
                from .bench_sd import bench_variants
            else:
                from .bench import bench_variants
            bench_variants({v: s.out_dir(ctx.root) for v, s in variants.items()}, out)

        yield {
            "basename": "bench",
            "name": recipe,
            "doc": f"benchmark {', '.join(variants)}",
            "actions": [run],
            "file_dep": [str(s.target(ctx.root)) for s in variants.values()],
            "task_dep": [f"validate:{s.task_name}" for s in variants.values()],
            "targets": [str(out / "bench.json")],
            "uptodate": [config_changed(digest_of(versions))],
            "verbosity": 2,
        }
