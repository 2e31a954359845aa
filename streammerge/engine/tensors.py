"""One tensor's computation: the method's task built from the open inputs, the method called,
its inputs and result checked for NaN/Inf, its diagnostics recorded under --report.

`TensorJob` is what the driver decided for a set of tensors (values, devices, dtypes): a local
merge and a Ray task compute the same job with the same code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError, NonFiniteError
from ..io.checkpoint import Checkpoint
from ..io.peft_oft import OftGenerators
from ..io.safetensors_format import DTYPES
from ..methods import Method, TensorTask, get_method
from ..plan import TensorPlan
from ..recipe import TensorValues
from .inputs import OutputTensor

FINITE_CHUNK = 1 << 22  # elements summed at once: a bf16 sum in float32 converts its operand


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf, in one pass and without a copy or mask the size of t: a sum is finite unless an
    input is NaN or ±Inf (or the sum overflows, which the exact check of that chunk then clears)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    flat = t.reshape(-1)
    wide = torch.float32 if t.dtype != torch.float64 else None
    for start in range(0, flat.numel(), FINITE_CHUNK):
        chunk = flat[start : start + FINITE_CHUNK]
        if not math.isfinite(float(chunk.sum(dtype=wide))) and not bool(torch.isfinite(chunk).all()):
            return False
    return True


def nonfinite_input(where: str, name: str, what: str = "tensor") -> NonFiniteError:
    """The one error for an input holding NaN or Inf."""
    return NonFiniteError(f"{where}: {what} {name!r} contains NaN or Inf (pass --allow-nonfinite to merge it anyway)")


class LazyExperts:
    """experts[i]: expert i's tensor `name`, loaded from its map in the compute dtype;
    experts.rows(i, start, stop): its rows [start, stop) only."""

    def __init__(self, ckpts: list, name: str, dtype: torch.dtype, device: torch.device, check_finite: bool):
        self.ckpts, self.name, self.dtype, self.device, self.check_finite = ckpts, name, dtype, device, check_finite

    def __len__(self) -> int:
        return len(self.ckpts)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._checked(i, self.ckpts[i].get(self.name, self.dtype, self.device))

    def rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        return self._checked(i, self.ckpts[i].get(self.name, self.dtype, self.device, rows=(start, stop)))

    def factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Expert i's task vector as low-rank factors (B', A') if it is a LoRA adapter, else None."""
        get = getattr(self.ckpts[i], "factors", None)
        if get is None:
            return None
        f = get(self.name, self.dtype, self.device)
        if f is not None and self.check_finite and not (all_finite(f[0]) and all_finite(f[1])):
            raise nonfinite_input(self.ckpts[i].file_of(self.name), self.name, "the adapter of")
        return f

    def _checked(self, i: int, t: torch.Tensor) -> torch.Tensor:
        if self.check_finite and not all_finite(t):
            raise nonfinite_input(self.ckpts[i].file_of(self.name), self.name)
        return t


@dataclass(frozen=True)
class TensorJob:
    """What the driver decided for the tensors a process computes; sent to Ray tasks as it is."""

    method: str  # the registered name (an alias resolved)
    values: dict[str, TensorValues]
    placement: dict[str, TensorPlan]
    compute_dtype: torch.dtype
    generators: bool  # OFT experts' stored generators are merged (Method.merges_generators)
    seed: int
    allow_nonfinite: bool
    plan_only: bool = False  # planning for a GPU that is not here: `plan --measure` reads on the CPU
    read_buffers: int = 0  # bytes of buffers the read-ahead may read blocks into (Plan.read_buffers)

    def for_tensors(self, names) -> "TensorJob":
        names = set(names)
        return dataclasses.replace(
            self,
            values={k: v for k, v in self.values.items() if k in names},
            placement={k: v for k, v in self.placement.items() if k in names},
        )


class TensorComputer:
    """Computes the tensors of a job from the open inputs (base, experts)."""

    def __init__(self, job: TensorJob, base, experts: list, report=None):
        self.job, self.base, self.experts, self.report = job, base, experts, report
        self.method: Method = get_method(job.method)[0]
        # every input a stored checkpoint (no adapter computing its weights): tasks may read them as stored
        self.all_stored = all(isinstance(src, Checkpoint) for src in (base, *experts))
        self._views: list[tuple[Checkpoint, str, tuple[int, int] | None]] = []  # mapped by stored()

    def device_of(self, name: str) -> torch.device:
        placed = self.job.placement.get(name)
        if self.job.plan_only or placed is None or placed.device not in ("cuda", "cpu"):
            return torch.device("cpu")
        return torch.device(placed.device)

    @property
    def check_inputs(self) -> bool:
        """Check every input as it is loaded (else: the result, then the inputs if it is not finite)."""
        return not self.job.allow_nonfinite and not self.method.propagates_nonfinite

    def load_base(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.load(name, None, rows, self.job.compute_dtype)

    def load(self, name: str, i: int | None, rows: tuple[int, int] | None, dtype: torch.dtype | None) -> torch.Tensor:
        """Expert i's tensor `name` (the base's for i = None), its rows `rows`, in `dtype` (None: as
        stored, for TensorTask.stored), checked for NaN/Inf where the method needs it."""
        src = self.base if i is None else self.experts[i]
        t = src.get(name, dtype, self.device_of(name), rows)
        if self.check_inputs and not all_finite(t):
            raise nonfinite_input(src.file_of(name), name)
        return t

    def task(self, t: OutputTensor, statistics: Any = None) -> TensorTask:
        job, values, device = self.job, self.job.values[t.name], self.device_of(t.name)
        placed = job.placement.get(t.name)
        state_on_host = placed is not None and device.type == "cuda" and "state" in placed.note
        task = TensorTask(
            t.name,
            lambda rows: self.load_base(t.name, rows),
            LazyExperts(self.experts, t.name, job.compute_dtype, device, self.check_inputs),
            values.weights,
            values.densities,
            statistics,
            job.seed,
            # type: ignore[arg-type]
            OftGenerators(self.experts, t.name, job.compute_dtype, device) if job.generators else None,
            torch.device("cpu") if state_on_host else None,
            out_dtype=DTYPES[t.dtype],
            shape=t.shape,
            dtype=job.compute_dtype,
            expert_values=values.experts,
        )
        if self.all_stored:
            task.stored = lambda i, rows: self.stored(t.name, i, rows)
        task.side_by_side = placed is not None and placed.side_by_side > 0 and device.type == "cpu"
        return task

    def stored(self, name: str, i: int | None, rows: tuple[int, int] | None) -> torch.Tensor:
        """TensorTask.stored: expert i's tensor (the base's for None) as stored. On the CPU, the
        file's mapped bytes themselves (Checkpoint.view), which the method reads and never writes:
        copying every input byte took a quarter of the compute thread of a task-arithmetic merge
        (bench/results/README.md, "Round five"). The views of one row block stay mapped until a
        view of another is asked for or the tensor is done (release_views)."""
        if self.device_of(name).type != "cpu":
            return self.load(name, i, rows, None)
        if self._views and self._views[0][1:] != (name, rows):
            self.release_views()
        src = self.base if i is None else self.experts[i]
        t = src.view(name, rows)
        self._views.append((src, name, rows))
        if self.check_inputs and not all_finite(t):
            raise nonfinite_input(src.file_of(name), name)
        return t

    def release_views(self) -> None:
        for src, name, rows in self._views:
            src.release(name, rows)
        self._views.clear()

    def merge(self, t: OutputTensor, statistics: Any, progress=None) -> torch.Tensor:
        """The output tensor `t`, in its output dtype, in host memory; `progress(fraction)` hears how
        far its method has come."""
        if not t.merged:
            return self.base.get(t.name, dtype=None)
        task = self.task(t, statistics)
        task.progress = progress
        if self.report is not None:
            task.diagnostics = {}
        try:
            result = self.method.merge(task, self.job.values[t.name].params)
        except ValueError as exc:  # a method that cannot merge these inputs says why, with the tensor
            raise InputError(f"tensor {t.name!r}: {self.method.name}: {exc}") from None
        finally:
            self.release_views()
        if self.report is not None:
            from ..report import generic_stats

            self.report.add(t.name, generic_stats(self.task(t), result) | task.diagnostics)
        if not self.job.allow_nonfinite and not task.vouched_finite and not all_finite(result):
            for src in (self.base, *self.experts):  # name the input that brought it
                if not all_finite(src.get(t.name, self.job.compute_dtype)):
                    raise nonfinite_input(src.file_of(t.name), t.name)
            raise NonFiniteError(
                f"merged tensor {t.name!r} has NaN or Inf although its inputs are finite (a bug: please report)"
            )
        # convert, then move: a blocking device-to-host copy would convert on the host, holding a
        # float32 copy of the result in RAM
        return result.to(DTYPES[t.dtype]).to("cpu")
