"""Merge methods: one module each, registered by name.

A method is pure tensor code over one weight name at a time. It receives a `TensorTask`:
the base tensor (compute dtype, on the compute device) and `experts`, a lazy sequence where
`experts[i]` loads expert i's tensor from its memory map. A method streams simply by
indexing experts one at a time, as many passes as it needs (task arithmetic: one; TIES: sign
election then disjoint mean; conflict-aware OrthoMerge: τ_mean then Procrustes), so at most
one expert tensor plus the method's accumulators is alive. `memory` states the peak bytes
for the planner (plan.py). A method that needs statistics over each expert's whole model (TIES at
model scope) declares `statistics`, run by the scheduler as passes over the model before
merging; its JSON-able result is journalled so a resumed merge does not recompute it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch

from ..errors import UsageError


class ExpertTensors(Protocol):
    """Lazy per-expert tensors for one weight name; each access loads (and copies) anew."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> torch.Tensor: ...


@dataclass
class TensorTask:
    name: str
    base: torch.Tensor
    experts: ExpertTensors
    weights: tuple[float, ...]
    densities: tuple[float | None, ...] = ()  # per-expert override, None: the method's own
    statistics: Any = None  # what the method's `statistics` returned, if it has one
    seed: int = 0
    generators: Any = None  # OFT experts only: per-expert generator blocks (scheduler.OftGenerators)
    state_device: Any = None  # where per-expert state goes (the plan may keep it in host RAM)

    def task_vector(self, i: int) -> torch.Tensor:
        """τ_i = W_i − W_0, in the compute dtype."""
        return self.experts[i].sub_(self.base)

    def rng(self, i: int) -> torch.Generator:
        """A CPU generator seeded by (seed, tensor name, expert index): reproducible anywhere."""
        key = f"{self.seed}\x00{self.name}\x00{i}".encode()
        g = torch.Generator(device="cpu")
        g.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1))
        return g


def elementwise_memory(buffers: float) -> Callable[..., Any]:
    """Peak of a method that holds `buffers` compute-dtype copies of the tensor (measured)."""
    from ..plan import Need

    def memory(name: str, shape: tuple[int, ...], n_experts: int, params: Any, itemsize: int) -> Need:
        numel = 1
        for d in shape:
            numel *= d
        return Need(int(buffers * numel * itemsize))

    return memory


# One pass over the whole model: yields (name, base, experts) for each mergeable tensor.
ModelPass = Callable[[], Iterator[tuple[str, torch.Tensor, ExpertTensors]]]


@dataclass(frozen=True)
class Method:
    name: str
    params_type: type
    merge: Callable[[TensorTask, Any], torch.Tensor]
    memory: Callable[[str, tuple[int, ...], int, Any, int], Any]  # (name, shape, n_experts, params, itemsize) -> plan.Need
    statistics: Callable[[ModelPass, int, Any, list[float]], Any] | None = None  # (pass, n_experts, params, densities)
    statistics_passes: Callable[[Any], int] = field(default=lambda params: 0)
    doc: str = ""


REGISTRY: dict[str, Method] = {}
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> tuple[Method, dict[str, Any]]:
    """The method for `name` and the parameters its alias implies (e.g. dare_ties)."""
    _load_all()
    if name in ALIASES:
        target, implied = ALIASES[name]
        return REGISTRY[target], dict(implied)
    if name not in REGISTRY:
        known = ", ".join(sorted(set(REGISTRY) | set(ALIASES)))
        raise UsageError(f"unknown merge method {name!r} (known: {known})")
    return REGISTRY[name], {}


def method_names() -> list[str]:
    _load_all()
    return sorted(set(REGISTRY) | set(ALIASES))


def build_params(params_type: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a frozen params dataclass from a dict, refusing unknown keys."""
    # `lambda` is a Python keyword: the dataclass field is `lambda_`.
    values = {("lambda_" if k == "lambda" else k): v for k, v in values.items()}
    known = {f.name for f in fields(params_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        shown = sorted(k.rstrip("_") for k in known)
        raise UsageError(f"{where}: unknown parameter(s) {', '.join(unknown)} (known: {', '.join(shown)})")
    try:
        return params_type(**values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: {exc}") from None


def _load_all() -> None:
    from . import dare, linear, orthomerge, task_arithmetic, ties  # noqa: F401  (registration)


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} = {value} is outside {lo}{low}, {high}{hi}")

