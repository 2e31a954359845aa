"""Per-tensor parameter values: gradients over layers and tensor-name filters (mergekit's rules).

A setting is what a recipe gives for one parameter:
- a scalar: the same value for every tensor;
- a list of scalars, a gradient: numbers are interpolated linearly over the layers (t = i/(L−1)
  for layer i of L; t = 0 for tensors outside the layers: embeddings, final norm, lm_head),
  booleans and strings pick the entry ⌊t·(n−1)⌋. Each entry is first read as the parameter's type
  (`coerce`, pydantic's lax rules as mergekit applies them: "1e-3" is a number for a float
  parameter and a label for a string one, 0/1 and "yes"/"off" are booleans for a boolean one), so
  the parameter's type decides whether a gradient interpolates or picks; an interpolated whole
  number must land on a whole number (mergekit refuses 7.5 for an int too);
- a list of {filter, value} mappings: the first whose `filter` is a substring of the tensor's
  name (or is absent or "*") gives the value, itself a scalar or a gradient; none matching
  means "not set here" (the next level of the recipe, then the default, applies).

These are mergekit 0.1.5's rules (mergekit/config.py `evaluate_setting`, plan.py), kept
identical because users bring mergekit recipes; our native recipes use the same rules.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import UsageError

_LAYER = re.compile(r"((?:^|\.)layers\.)(\d+)(\.)")  # the one rule for "which decoder layer" in this project


def is_constant(setting: Any) -> bool:
    return not isinstance(setting, (list, tuple, dict))


def check_setting(setting: Any, where: str) -> None:
    """Refuse shapes mergekit does not accept, with the key named (`where`)."""
    if is_constant(setting):
        if setting is not None and not isinstance(setting, (bool, int, float, str)):
            raise UsageError(f"{where}: {setting!r} is not a number, boolean or string")
        return
    if isinstance(setting, dict):
        setting = [setting]
    if not setting:
        raise UsageError(f"{where}: an empty list")
    if all(is_constant(e) for e in setting):
        for e in setting:
            check_setting(e, where)
        return
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise UsageError(
                f"{where}: a list mixing values and filters; each filter entry is {{filter: NAME-PART, value: V}}"
            )
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise UsageError(f"{where}: filter {cond['filter']!r} is not a string")
        if isinstance(cond["value"], (dict,)) or (
            isinstance(cond["value"], list) and not all(is_constant(v) for v in cond["value"])
        ):
            raise UsageError(f"{where}: a filter's value is a scalar or a gradient (a list of scalars)")
        check_setting(cond["value"], where)


BOOLEAN_WORDS = {"1": True, "on": True, "t": True, "true": True, "y": True, "yes": True,
                 "0": False, "off": False, "f": False, "false": False, "n": False, "no": False}  # fmt: skip
KIND_NAMES = {"float": "a number", "int": "a whole number", "bool": "true or false", "str": "a string"}


def coerce(value: Any, kind: str | None, where: str) -> Any:
    """`value` read as a parameter of scalar type `kind` (float, int, bool, str; None: as it is),
    by pydantic's lax rules, which mergekit validates every setting with."""
    if kind is None or value is None:
        return value
    out: Any = None
    if kind == "float":
        if isinstance(value, bool):
            out = float(value)
        elif isinstance(value, (int, float)):
            out = value  # an int stays an int: the same arithmetic, the same record as before
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                pass
    elif kind == "int":
        if isinstance(value, (bool, int)):
            out = int(value)
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            out = int(value)
    elif kind == "bool":
        if isinstance(value, bool):
            out = value
        elif isinstance(value, (int, float)) and value in (0, 1):
            out = bool(value)
        elif isinstance(value, str):
            out = BOOLEAN_WORDS.get(value.strip().lower())
    elif kind == "str":
        out = value if isinstance(value, str) else None
    if out is None:
        raise UsageError(f"{where} must be {KIND_NAMES[kind]}, not {value!r}")
    return out


def evaluate(setting: Any, tensor_name: str, t: float, kind: str | None = None, where: str = "") -> Any:
    """The value of `setting` for one tensor at layer fraction `t` (None: not set here), read as
    a parameter of scalar type `kind` (see `coerce`)."""
    if isinstance(setting, dict):
        setting = [setting]
    if is_constant(setting):
        return coerce(setting, kind, where)
    if not setting:
        return None
    if all(is_constant(e) for e in setting):
        values = [coerce(e, kind, where) for e in setting]
        numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values)
        if not numeric:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return coerce((1 - frac) * values[i0] + frac * values[i1], kind, where)
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate(cond["value"], tensor_name, t, kind, where)
    return None


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(2)) if m else None


def with_layer(name: str, layer: int | str) -> str:
    """`name` with its layer index replaced (renumbering stacked layers; "*" pools them)."""
    return _LAYER.sub(lambda m: f"{m.group(1)}{layer}{m.group(3)}", name, count=1)


def layer_fraction(name: str, n_layers: int) -> float:
    """t of a tensor: i/(L−1) in layer i of L (1 when L = 1), 0 outside the layers."""
    i = layer_index(name)
    if i is None:
        return 0.0
    return i / (n_layers - 1) if n_layers > 1 else 1.0


def count_layers(names: list[str]) -> int:
    """The number of decoder layers a model's tensor names show."""
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 0


def resolve(levels: list[Any], tensor_name: str, t: float, kind: str | None = None, where: str = "") -> Any:
    """The first level (most specific first) whose setting gives a value; None if none does."""
    for setting in levels:
        if setting is None:
            continue
        value = evaluate(setting, tensor_name, t, kind, where)
        if value is not None:
            return value
    return None
