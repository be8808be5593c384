"""Recipes: YAML -> typed, frozen config.

Every problem in a recipe becomes one `RecipeError` whose message names the
file, the key path and what is allowed, so a user never reads a pydantic dump.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator

RECIPES_DIR_DEFAULT = Path("recipes")
CONFIGS_DIR = "configs"  # named model configs live in recipes/configs/<name>.json


class RecipeError(ValueError):
    """A recipe that cannot be used, with a one-line reason."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


# ---- sources -------------------------------------------------------------


class HubSource(Strict):
    repo: str = Field(min_length=1)
    revision: str = Field(min_length=1, description="a commit sha, so builds are reproducible")


class TrainedTokenizer(Strict):
    """A byte-level BPE trained on local text: only for random-weight models."""

    train_on: str = Field(min_length=1, description="text file, relative to the project root")
    vocab_size: int = Field(ge=260, le=100_000)


class RandomSource(Strict):
    # Either an inline config dict or the name of a config in recipes/configs/.
    config: dict[str, Any] | str
    seed: int = Field(ge=0)
    tokenizer: TrainedTokenizer
    # Optional short training on the tokenizer corpus, so that tiny models write
    # word-like text and pruning has a perplexity cost worth measuring.
    train_steps: int = Field(default=0, ge=0, le=100_000)


class WorldSpec(Strict):
    """The pocket world a `train` source learns from (see onnxforge.world): which colours and shapes."""

    colours: tuple[str, ...] | None = None  # None: every colour of the world
    shapes: tuple[str, ...] | None = None  # None: every shape
    max_shapes: int = 1
    size: int = 64  # picture side in pixels

    @model_validator(mode="after")
    def known_to_the_world(self):
        self.world()  # raises WorldError (a ValueError: reported as a recipe error in one line)
        return self

    def world(self):
        from .world import WorldConfig

        given = {k: v for k, v in self.model_dump().items() if v is not None}
        return WorldConfig(**given)


class TrainSteps(Strict):
    """What every family's `train` source has: a seed and a number of optimizer steps (at least one)."""

    seed: int = Field(ge=0)
    steps: int = Field(le=100_000, description="optimizer steps")

    @model_validator(mode="after")
    def trains(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1 (got {self.steps}): a train source with no steps "
                             "would publish an untrained model")
        return self


class OneOf(Strict):
    """Exactly one of the KINDS keys is given: a source, or a part of one (sd's LoRA and TAESD)."""

    KINDS: ClassVar[tuple[str, ...]] = ("hub", "path", "random")

    @model_validator(mode="after")
    def exactly_one(self):
        given = [k for k in self.KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(self.KINDS)} (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) is not None)


class Source(OneOf):
    """Where a model's weights come from; a family's recipe may add kinds (e.g. gpt2's `train`) and other keys
    (e.g. sd's `lora`, which go with a kind)."""

    hub: HubSource | None = None
    path: str | None = None
    random: RandomSource | None = None


# ---- budgets (checked on built artifacts by onnxforge/budgets.py) ----------------------------


SHARED_FIGURES = {
    "size_mib": "MiB on disk of the version folder (every file)",
    "peak_rss_mib": "peak RSS (MiB) of the check's standard run of the variant",
    # Structural, so exact: an int8 variant whose graph stayed fp32 keeps every float weight (ratio 1.0 to fp32).
    "float_weight_mib": "MiB of float (fp32/fp16) weights in the variant's ONNX graphs",
}


class Ratio(Strict):
    # A variant of this recipe, or `<recipe>/<variant>` of another recipe of the same family (e.g. a fast-path
    # recipe's UNet against sd-tiny/fp32's CFG UNet): either way measured in the same run.
    of: str = Field(min_length=1, description="the reference variant, measured in the same run")
    max: float = Field(gt=0)


class Ceiling(Strict):
    """An absolute ceiling, valid only on the machine class it was set on (as the bench harness records it)."""

    max: float = Field(gt=0)
    cpu: str = Field(min_length=1, description="/proc/cpuinfo model name")
    simd: tuple[str, ...] = Field(description="the SIMD flags the bench harness records (avx2, avx512f, ...)")


class VariantBudget(Strict):
    size_mib: float | None = Field(default=None, gt=0)
    peak_rss_mib: float | None = Field(default=None, gt=0)
    ratio: dict[str, Ratio] = {}
    ceiling: dict[str, Ceiling] = {}

    def figures(self) -> set[str]:
        named = set(self.ratio) | set(self.ceiling)
        return named | {f for f in ("size_mib", "peak_rss_mib") if getattr(self, f) is not None}


def family_figures(family: str) -> dict[str, str]:
    from .families import FAMILIES

    fam = FAMILIES.get(family)
    return {**SHARED_FIGURES, **(getattr(fam.bench, "FIGURES", {}) if fam and fam.bench else {})}


def validate_budgets(budgets: dict[str, VariantBudget], variants: list[str], family: str) -> None:
    """Every budget names a variant of the recipe and a figure of its family; a ratio names another variant."""
    figures = family_figures(family)
    for name, b in budgets.items():
        if name not in variants:
            raise ValueError(f"budgets.{name}: no such variant (this recipe's variants: {', '.join(variants)})")
        for kind, table in (("ratio", b.ratio), ("ceiling", b.ceiling)):
            for fig in table:
                if fig not in figures:
                    raise ValueError(f"budgets.{name}.{kind}.{fig}: unknown figure; {family} figures: {', '.join(figures)}")
        for fig, r in b.ratio.items():
            if "/" in r.of:  # another recipe's variant: whether it is built is the check's to say
                continue
            if r.of not in variants:
                raise ValueError(f"budgets.{name}.ratio.{fig}.of: no such variant {r.of!r} "
                                 f"(this recipe's variants: {', '.join(variants)})")
            if r.of == name:
                raise ValueError(f"budgets.{name}.ratio.{fig}.of: a variant cannot be its own reference")


def variant_names(variants) -> list[str]:
    """The enabled variant names of any family's `variants` (a model with enabled(), or a plain dict)."""
    return list(variants.enabled() if hasattr(variants, "enabled") else variants)


# ---- what every family's recipe has; the rest is the family's (families/<name>/recipe.py) ----


class RecipeBody(Strict):
    """The keys every recipe shares. A family's recipe schema subclasses this and adds its own."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    family: str
    description: str = ""
    default: bool = False  # built by a plain `doit build`
    # Variant name -> the figures it must stay within (see onnxforge/budgets.py); checked, never built on.
    budgets: dict[str, VariantBudget] = {}

    @model_validator(mode="after")
    def budgets_name_known_things(self):
        if self.budgets:
            validate_budgets(self.budgets, variant_names(getattr(self, "variants", {})), self.family)
        return self


class Recipe(Strict):
    """A loaded recipe: its name (the file stem), its file, and the typed body (the family's schema)."""

    name: str
    path: str
    body: SerializeAsAny[RecipeBody]
    text_digest: str  # sha256 of the validated body, for the manifest


def _format_error(path: Path, err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: {loc}: unknown key"
    if kind == "missing":
        return f"{path}: {loc}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{path}: {loc}: {msg}{got_txt}" if loc else f"{path}: {msg}"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Walk the model along loc (all but the last part) and list the allowed keys there."""
    current: Any = model
    keyed = False  # the part before was a dict field: this part is a key of it (a variant name), not a field
    for part in loc[:-1]:
        if keyed:
            keyed = False
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None:
            return []
        match = next((f for n, f in fields.items() if part in (n, f.alias)), None)
        if match is None:
            return []
        ann = match.annotation
        keyed = getattr(ann, "__origin__", None) is dict
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        current = inner[0]
    return [f.alias or n for n, f in current.model_fields.items()]


def resolve_named_config(name: str, recipes_dir: Path) -> dict:
    cfg_path = recipes_dir / CONFIGS_DIR / f"{name}.json"
    if not cfg_path.is_file():
        known = sorted(p.stem for p in (recipes_dir / CONFIGS_DIR).glob("*.json"))
        raise RecipeError(f"source.random.config: no named config {name!r}; known: {', '.join(known) or 'none'}")
    return json.loads(cfg_path.read_text())


def load_recipe(path: str | Path) -> Recipe:
    import difflib
    import hashlib

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys (family, source, variants, ...), got {type(data).__name__}")
    from .families import FAMILIES

    family = data.get("family")
    if family not in FAMILIES:
        raise RecipeError(f"{path}: family: must be one of {', '.join(FAMILIES)} (got {family!r})")
    model = FAMILIES[family].recipe
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelt key ("varients") also makes the key it was meant to be missing: name the typo first.
        err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        line = _format_error(path, err)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"])
            if allowed:
                line += f"; allowed: {', '.join(allowed)}"
                close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
                if close:
                    line += f"; did you mean {close[0]}?"
        raise RecipeError(line) from None
    if isinstance(getattr(getattr(getattr(body, "source", None), "random", None), "config", None), str):
        try:
            resolve_named_config(body.source.random.config, path.parent)
        except RecipeError as exc:
            raise RecipeError(f"{path}: {exc}") from None
    canonical = json.dumps(body.model_dump(mode="json", by_alias=True), sort_keys=True)
    return Recipe(name=path.stem, path=str(path), body=body, text_digest=hashlib.sha256(canonical.encode()).hexdigest())


def load_recipes(recipes_dir: str | Path, errors: dict[str, str] | None = None) -> dict[str, Recipe]:
    """Every recipe in the folder. With `errors` given, a broken recipe is reported there (name -> one line)
    and the others still load; without it the first broken recipe raises."""
    recipes_dir = Path(recipes_dir)
    out = {}
    for p in sorted(recipes_dir.glob("*.yaml")):
        try:
            out[p.stem] = load_recipe(p)
        except RecipeError as exc:
            if errors is None:
                raise
            errors[p.stem] = str(exc)
    return out
