"""Every merge method except OrthoMerge, by name, with the aliases that imply parameters.

OrthoMerge takes one of these for its residuals, so it sits above them: the package face
(`methods/__init__.py`) adds it. A new method is one module that defines `METHOD` (and, if it
has aliases, `ALIASES`), listed here.
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError, did_you_mean
from . import (
    arcee_fusion,
    dare,
    do_merging,
    gta,
    iso_c,
    iso_cts,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    ortho_svd,
    passthrough,
    ram,
    ramplus_tl,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv,
)
from .base import Method

MODULES = (
    arcee_fusion, dare, do_merging, gta, iso_c, iso_cts, karcher, linear, model_stock, multislerp, nearswap,
    nuslerp, ortho_svd, passthrough, ram, ramplus_tl, sce, slerp, task_arithmetic, ties, tsv,
)  # fmt: skip
REGISTRY: dict[str, Method] = {m.METHOD.name: m.METHOD for m in MODULES}
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {k: v for m in MODULES for k, v in getattr(m, "ALIASES", {}).items()}


def lookup(
    name: str, registry: dict[str, Method], aliases: dict[str, tuple[str, dict[str, Any]]]
) -> tuple[Method, dict]:
    """The method for `name` and the parameters its alias implies (e.g. dare_ties)."""
    if name in aliases:
        target, implied = aliases[name]
        return registry[target], dict(implied)
    if name not in registry:
        names = sorted(set(registry) | set(aliases))
        raise UsageError(f"unknown merge method {name!r}{did_you_mean([name], names)} (known: {', '.join(names)})")
    return registry[name], {}


def get_method(name: str) -> tuple[Method, dict[str, Any]]:
    """A method other than OrthoMerge (OrthoMerge's residual methods)."""
    return lookup(name, REGISTRY, ALIASES)
