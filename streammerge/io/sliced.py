"""Layer slices (mergekit's `slices:` with `passthrough`): a model stacked from layer ranges of
other models, presented as one Checkpoint whose tensors are read from their sources in place.

Output layers are numbered in slice order; layer i of a source becomes `layers.j` of the output.
Tensors outside the layers come from the first slice's model if their name holds "embed" (the
embeddings, before the layers) and from the last slice's model otherwise (final norm, lm_head),
as mergekit's pre- and post-weights do for Llama-style models. A tensor's `t` for gradients is
its position in its slice, offset/(n−1) (1 for a one-layer slice), and 0 outside the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InputError, UsageError
from ..settings import count_layers, layer_index, with_layer
from .checkpoint import Checkpoint


@dataclass(frozen=True)
class SourceOf:
    """Where one output tensor comes from, and what resolves its settings."""

    model: str
    name: str  # the tensor's name in its model
    t: float
    levels: tuple[Any, ...]  # `scale` settings, most specific first: the source's, then its slice's


def parse_slices(slices: Any, where: str) -> tuple[dict, ...]:
    """mergekit's slices list, checked: [{sources: [{model, layer_range, parameters}], parameters}]."""
    if not isinstance(slices, list) or not slices:
        raise UsageError(f"{where}: 'slices' must be a non-empty list")
    out = []
    for i, s in enumerate(slices):
        if (
            not isinstance(s, dict)
            or "sources" not in s
            or set(s) - {"sources", "parameters", "base_model", "residual_weight"}
        ):
            raise UsageError(f"{where}: slices[{i}] is a mapping with 'sources' and optional 'parameters'")
        if s.get("base_model") is not None or s.get("residual_weight") is not None:
            raise UsageError(f"{where}: slices[{i}]: per-slice base_model and residual_weight are not supported")
        sources = s["sources"]
        if not isinstance(sources, list) or len(sources) != 1:
            raise UsageError(
                f"{where}: slices[{i}]: passthrough takes exactly one source per slice, got "
                f"{len(sources) if isinstance(sources, list) else sources!r}"
            )
        src = sources[0]
        if (
            not isinstance(src, dict)
            or set(src) - {"model", "layer_range", "parameters"}
            or "model" not in src
            or "layer_range" not in src
        ):
            raise UsageError(
                f"{where}: slices[{i}].sources[0] needs 'model' and 'layer_range' (and may have 'parameters')"
            )
        lr = src["layer_range"]
        if not (
            isinstance(lr, list)
            and len(lr) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
            and 0 <= lr[0] < lr[1]
        ):
            raise UsageError(f"{where}: slices[{i}]: layer_range {lr!r} is not [start, end) with 0 ≤ start < end")
        for what, params in (("source", src.get("parameters")), ("slice", s.get("parameters"))):
            if params and set(params) - {"scale"}:
                raise UsageError(
                    f"{where}: slices[{i}] {what} parameters: {', '.join(sorted(set(params) - {'scale'}))} "
                    "(passthrough takes only scale)"
                )
        out.append(
            {
                "model": str(src["model"]),
                "layer_range": [lr[0], lr[1]],
                "scale": (src.get("parameters") or {}).get("scale"),
                "slice_scale": (s.get("parameters") or {}).get("scale"),
            }
        )
    return tuple(out)


def open_sliced(slices: tuple[dict, ...], config_model: str) -> tuple[Checkpoint, dict[str, SourceOf], int]:
    """(the stacked model as a Checkpoint, each output tensor's source, the output's layer count)."""
    models = {}
    for s in slices:
        if s["model"] not in models:
            models[s["model"]] = Checkpoint.open(s["model"])
    locations, sources, j = {}, {}, 0

    def add(out_name: str, ck: Checkpoint, name: str, t: float, levels: tuple) -> None:
        locations[out_name] = ck.locations[name]
        sources[out_name] = SourceOf(ck.folder, name, t, levels)

    first, last = models[slices[0]["model"]], models[slices[-1]["model"]]
    for name in first.names():
        if layer_index(name) is None and "embed" in name:
            add(name, first, name, 0.0, (slices[0]["scale"], slices[0]["slice_scale"]))
    for s in slices:
        ck = models[s["model"]]
        layers = count_layers(ck.names())
        start, end = s["layer_range"] or (0, layers)  # None: the whole model (passthrough of one model)
        if end > layers:
            raise InputError(f"{ck.folder}: layer_range [{start}, {end}) but the model has {layers} layers")
        by_layer: dict[int, list[str]] = {}
        for name in ck.names():
            i = layer_index(name)
            if i is not None:
                by_layer.setdefault(i, []).append(name)
        n = end - start
        for offset in range(n):
            for name in by_layer.get(start + offset, []):
                out_name = with_layer(name, j)
                add(out_name, ck, name, offset / (n - 1) if n > 1 else 1.0, (s["scale"], s["slice_scale"]))
            j += 1
    for name in last.names():
        if layer_index(name) is None and "embed" not in name:
            add(name, last, name, 0.0, (slices[-1]["scale"], slices[-1]["slice_scale"]))
    files = [f for ck in models.values() for f in ck.files]
    headers = {f: h for ck in models.values() for f, h in ck.headers.items()}
    import os

    return Checkpoint(os.path.abspath(config_model), files, headers, locations), sources, j
