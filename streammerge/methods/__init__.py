"""Merge methods: one module each, by name.

A method is pure tensor code over one weight name at a time (base.py: `TensorTask`, `Method`).
It receives a `TensorTask`: the base tensor (compute dtype, on the compute device) and
`experts`, a lazy sequence where `experts[i]` loads expert i's tensor from its memory map. A
method streams simply by indexing experts one at a time, as many passes as it needs, so at most
one expert tensor plus the method's accumulators is alive. `memory` states the peak bytes for
the planner (plan.py). docs/architecture.md says how to add one.
"""

from __future__ import annotations

from typing import Any

from . import orthomerge, registry
from .base import (
    BLOCK_ELEMENTS,
    REQUIRED,
    ExpertTensors,
    MapPass,
    Method,
    ModelBlocks,
    Rows,
    TensorTask,
    build_params,
    param_kind,
    holds_whole,
    map_row_blocks,
    ordered_sum,
)

REGISTRY: dict[str, Method] = {**registry.REGISTRY, orthomerge.METHOD.name: orthomerge.METHOD}
ALIASES = registry.ALIASES


def get_method(name: str) -> tuple[Method, dict[str, Any]]:
    """The method for `name` and the parameters its alias implies (e.g. dare_ties)."""
    return registry.lookup(name, REGISTRY, ALIASES)


def method_names() -> list[str]:
    return sorted(set(REGISTRY) | set(ALIASES))


__all__ = [
    "BLOCK_ELEMENTS", "REQUIRED", "ExpertTensors", "MapPass", "Method", "ModelBlocks", "Rows", "TensorTask",
    "build_params", "param_kind", "get_method", "holds_whole", "map_row_blocks", "method_names", "ordered_sum",
]  # fmt: skip
