"""Model families, one module each: sd.py (SD 1.x ``sd15`` and 2.x ``sd2``), sdxl.py (``sdxl``).

``FAMILIES`` / ``family_facts(name)``: each family's plain facts (facts.py), importable without torch (the
client, rentrain, reads them on the laptop). ``get_family(name)``: the family's implementation of
``ModelFamily`` (base.py), imported on first use (it needs torch). docs/trainer.md, "Adding a model family".
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .facts import FAMILIES, Architecture, FamilyFacts, FamilyProfile, family_facts

if TYPE_CHECKING:
    from .base import ModelFamily

__all__ = ["FAMILIES", "Architecture", "FamilyFacts", "FamilyProfile", "family_facts", "get_family"]


def get_family(name: str) -> ModelFamily:
    """The implementation of the family called ``name`` (a KeyError naming the known ones otherwise)."""
    module = importlib.import_module(family_facts(name).module)
    implementations: dict[str, ModelFamily] = module.IMPLEMENTATIONS
    return implementations[name]
