"""The family registry: one dict, filled here. A new family is one package plus one line below.

A family outside this package (a plugin, or a test's toy family) is registered by naming its module
in ONNXFORGE_FAMILIES (comma-separated); the module exposes `FAMILY`.
"""

from __future__ import annotations

import importlib
import os

from .family import Family
from .gpt2 import FAMILY as GPT2
from .sam import FAMILY as SAM
from .sam2 import FAMILY as SAM2
from .sd import FAMILY as SD

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2, SAM, SAM2, SD)}

for _module in filter(None, (m.strip() for m in os.environ.get("ONNXFORGE_FAMILIES", "").split(","))):
    _family = importlib.import_module(_module).FAMILY
    FAMILIES[_family.name] = _family


def family_of_kind(kind: str) -> Family | None:
    """The family whose artifacts carry this manifest runtime.kind."""
    return next((f for f in FAMILIES.values() if f.runtime_kind == kind), None)
