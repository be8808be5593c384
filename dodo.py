"""doit entry point: `doit build` builds the default recipes; `doit list` shows every task.

    doit build                       default recipes (those with `default: true`)
    doit build recipes=gpt2-medium   named recipes (comma-separated)
    doit validate:gpt2-tiny-kv       one artifact, with what it needs
    doit bench:gpt2-tiny             benchmark a recipe's variants (not part of build)
    doit check                       check what is built of the default recipes against their budgets
    doit check recipes=a reps=5      named recipes, more interleaved repetitions (builds nothing)

A broken recipe is reported in one line and left out; the others still build. Naming it fails.
"""

import sys


from doit import get_var

from onnxforge.config import load_recipes
from onnxforge.store import StageContext
from onnxforge.tasks import bench_task, check_task, plan_all, project_paths, publish_task_names, stage_tasks

PROJECT, RECIPES, ARTIFACTS = project_paths()
DOIT_CONFIG = {
    "default_tasks": ["build"],
    "dep_file": str(ARTIFACTS / ".doit.db"),
    "backend": "json",
    "verbosity": 2,
}
ARTIFACTS.mkdir(parents=True, exist_ok=True)
_BROKEN: dict[str, str] = {}  # recipe name -> one line saying what is wrong
_RECIPES = load_recipes(RECIPES, errors=_BROKEN)
_PLANS = plan_all(_RECIPES, PROJECT, errors=_BROKEN)
for _line in _BROKEN.values():  # one line each, not a traceback from inside doit's loader
    print(f"warning: skipping a broken recipe: {_line}", file=sys.stderr)
_CTX = StageContext(root=ARTIFACTS, project_dir=PROJECT)


def _selected():
    named = get_var("recipes", "")
    if named:
        chosen = [n.strip() for n in named.split(",") if n.strip()]
        broken = [n for n in chosen if n in _BROKEN]
        if broken:
            raise SystemExit("error: " + "; ".join(_BROKEN[n] for n in broken))
        unknown = [n for n in chosen if n not in _PLANS]
        if unknown:
            raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(_PLANS)}")
        return chosen
    return [n for n, r in _RECIPES.items() if r.body.default and n in _PLANS]


def task_build():
    """Build the default recipes, or `recipes=a,b`."""
    chosen = _selected()
    if not chosen:
        return {"actions": [lambda: print("no recipe has `default: true`; name some: doit build recipes=a,b")]}
    return {"actions": None, "task_dep": publish_task_names(_PLANS, chosen)}


def task_stages():
    yield from stage_tasks(_PLANS, _CTX)


def task_bench():
    """Benchmark each recipe's variants (prefill, decode, RSS, size); JSON + PNG."""
    yield from bench_task(_PLANS, _CTX)


def task_check():
    """Check the built default recipes (or `recipes=a,b`) against their budgets: size, memory, latency ratios."""
    from onnxforge.budgets import DEFAULT_REPS

    reps = get_var("reps", str(DEFAULT_REPS))
    if not reps.isdigit() or int(reps) < 1:
        raise SystemExit(f"reps={reps}: give a whole number of interleaved repetitions, 1 or more")
    yield from check_task(_RECIPES, _selected(), ARTIFACTS, int(reps))
