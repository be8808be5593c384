"""doit task creators: one task per stage per artifact, named `<stage>:<recipe>-<variant>`.

Nothing here knows a family: each recipe's family (families.FAMILIES) plans its stages.
"""

from __future__ import annotations

import os
from pathlib import Path

from doit.tools import config_changed

from .config import Recipe, RecipeError
from .store import StageContext, StageSpec, run_stage


def project_paths() -> tuple[Path, Path, Path]:
    """(project dir, recipes dir, artifacts root); the env vars let tests build in a tmp dir."""
    project = Path(os.environ.get("ONNXFORGE_PROJECT", Path.cwd())).resolve()
    recipes = Path(os.environ.get("ONNXFORGE_RECIPES", project / "recipes")).resolve()
    artifacts = Path(os.environ.get("ONNXFORGE_ARTIFACTS", project / "artifacts")).resolve()
    return project, recipes, artifacts


def walk(spec: StageSpec):
    """This stage and every stage upstream of it, upstream first (repeats included)."""
    for u in spec.upstream:
        yield from walk(u)
    yield spec


def plan_recipe(recipe: Recipe, project_dir: Path) -> dict[str, StageSpec]:
    """The recipe's family plans it; a stage the family does not define fails here, before any build."""
    from .families import FAMILIES

    family = FAMILIES[recipe.body.family]
    plan = family.plan(recipe, project_dir)
    for spec in plan.values():
        for s in walk(spec):
            if s.stage not in family.stages:
                raise RecipeError(f"{recipe.path}: family {family.name!r} plans a {s.stage!r} stage for "
                                  f"{s.task_name} but defines no such stage (it has {', '.join(family.stages)})")
    return plan


def plan_all(recipes: dict[str, Recipe], project_dir: Path, errors: dict[str, str] | None = None) -> dict[str, dict[str, StageSpec]]:
    """Plans of every recipe. With `errors`, a recipe whose plan fails is reported there and left out."""
    plans = {}
    for name, r in recipes.items():
        try:
            plans[name] = plan_recipe(r, project_dir)
        except RecipeError as exc:
            if errors is None:
                raise
            errors[name] = str(exc)
    return plans


def _run(spec: StageSpec, ctx: StageContext):
    """Expected failures become one clear line in doit's report, not a traceback."""
    from doit.exceptions import TaskFailed

    from .sources import SourceError
    from .store import StageProcessFailed, ValidationFailed

    try:
        run_stage(spec, ctx)
    except (SourceError, ValidationFailed, RecipeError, FileNotFoundError, NotImplementedError,
            StageProcessFailed) as exc:
        return TaskFailed(f"{spec.stage}:{spec.task_name}: {exc}")


def stage_tasks(plans: dict[str, dict[str, StageSpec]], ctx: StageContext):
    """Yield doit task dicts, grouped by stage in pipeline order (the order stages first appear upstream-first)."""
    seen: dict[str, StageSpec] = {}
    for variants in plans.values():
        for spec in variants.values():
            for s in walk(spec):
                seen.setdefault(f"{s.stage}:{s.task_name}", s)
    stages = list(dict.fromkeys(s.stage for s in seen.values()))
    for stage in stages:
        yield {"basename": stage, "name": None, "doc": f"{stage} stage of each artifact"}
        for name, spec in seen.items():
            if spec.stage != stage:
                continue
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
    return [f"{plans[r][v].stage}:{plans[r][v].task_name}" for r in recipe_names for v in plans[r]]


def bench_task(plans: dict[str, dict[str, StageSpec]], ctx: StageContext):
    """`bench:<recipe>`: all published variants of a recipe measured in one run (the family's benchmark)."""
    from .store import digest_of

    yield {"basename": "bench", "name": None, "doc": "benchmark a recipe's variants (not part of build)"}
    for recipe, variants in plans.items():
        versions = {v: s.digest for v, s in variants.items()}
        out = ctx.root / recipe / "bench" / digest_of(versions)

        def run(variants=variants, out=out):
            from .bench import bench_variants

            bench_variants({v: s.out_dir(ctx.root) for v, s in variants.items()}, out)

        yield {
            "basename": "bench",
            "name": recipe,
            "doc": f"benchmark {', '.join(variants)}",
            "actions": [run],
            "file_dep": [str(s.target(ctx.root)) for s in variants.values()],
            "task_dep": [f"{s.stage}:{s.task_name}" for s in variants.values()],
            "targets": [str(out / "bench.json")],
            "uptodate": [config_changed(digest_of(versions))],
            "verbosity": 2,
        }


def check_task(recipes: dict[str, Recipe], chosen: list[str], root: Path, reps: int):
    """`check:<recipe>`: the recipe's budgets measured on what is built (builds nothing: run `doit build` first)."""
    from doit.exceptions import TaskFailed

    yield {"basename": "check", "name": None, "doc": "check built artifacts against their recipes' budgets"}
    with_budgets = [n for n in chosen if recipes[n].body.budgets]
    if not with_budgets:
        yield {"basename": "check", "name": "none", "uptodate": [False], "verbosity": 2,
               "actions": [lambda: print(f"no budgets in {', '.join(chosen) or 'the chosen recipes'}: nothing to check")]}
    for name in with_budgets:
        def run(recipe=recipes[name]):
            from .budgets import CheckError, broken_lines, check_recipe

            try:
                broken = broken_lines(check_recipe(recipe, root, reps=reps))
            except CheckError as exc:
                return TaskFailed(f"check:{recipe.name}: {exc}")
            if broken:
                return TaskFailed("budget broken: " + "; ".join(broken))

        yield {"basename": "check", "name": name, "doc": f"budgets of {name}", "actions": [run],
               "uptodate": [False], "verbosity": 2}
