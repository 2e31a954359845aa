"""The streaming loop: validate → plan shards → (statistics passes) → per shard: compute each
tensor, stream it to the shard file, commit, journal → copy config/tokenizer → index last.

Tensors are taken in the base model's file and offset order so that reads are sequential.
Resume works per shard: a shard is either finished (durable, in the journal) or redone whole,
and every tensor's result depends only on the inputs and its name, so a resumed output is
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .errors import InputError, Interrupted, NonFiniteError, ResourceError, ResumeError, UsageError, collect
from .io.atomic import TMP_SUFFIX, ShardWriter, os_error, temp_name, write_bytes_atomic
from .io.checkpoint import INDEX_NAME, Checkpoint, load_json
from .io.experts import ExpertSource, open_expert
from .io.peft_oft import OftExpert, OftGenerators, check_oft_conventions
from .io.journal import Journal, journal_path
from .io.lock import PID_NAME, OutputLock
from .io.safetensors_format import DTYPE_NAMES, DTYPES, FLOAT_DTYPES, itemsize
from .memwatch import PeakSampler, return_freed_memory_to_os, rss_anon
from .methods import TensorTask
from .plan import Plan, TensorPlan, default_gpu_budget, default_ram_budget, free_disk, place
from .units import format_size
from .prefetch import ReadAhead
from . import settings
from .output_files import CARD_NAME, CONFIG_FILES, TOKENIZER_FILES, copy_model_files, tokenizer_donor, write_card
from .recipe import Recipe, TensorValues, parse_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    merged: bool  # False: copied from the base (non-float tensors)

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Shard:
    filename: str
    tensors: tuple[OutputTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ResourceError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(device)


def open_inputs(recipe: Recipe, base: Checkpoint | None = None) -> tuple[Checkpoint, list[ExpertSource]]:
    """The base (or `base`, already open: a stack of layer slices) and the experts."""
    problems, experts = [], []
    if base is None:
        base = Checkpoint.open(recipe.base)
    for e in recipe.experts:
        try:
            experts.append(open_expert(e.path, base, e.peft_version))
        except InputError as exc:
            problems.append(str(exc))
    collect(problems, InputError, "inputs")
    return base, experts


def check_compatible(base: Checkpoint, experts: list[ExpertSource]) -> None:
    """Every expert has the base's tensors, shapes, and castable dtypes (adapters: targets that
    exist and fit); all problems at once."""
    problems = []
    base_names = base.locations
    for ck in experts:
        if not isinstance(ck, Checkpoint):
            problems += ck.problems_against(base)
            continue
        names = ck.locations
        for n in base_names:
            if n not in names:
                if base.info(n).dtype not in FLOAT_DTYPES:
                    continue  # copied from the base, never merged (transformers ≥ 4.3x no longer saves position_ids)
                problems.append(f"{ck.folder}: tensor {n!r} is missing (it is in the base)")
                continue
            b, e = base.info(n), ck.info(n)
            if b.shape != e.shape:
                problems.append(f"{ck.file_of(n)}: tensor {n!r} has shape {list(e.shape)}, the base {list(b.shape)}")
            elif (b.dtype in FLOAT_DTYPES) != (e.dtype in FLOAT_DTYPES) or (
                b.dtype not in FLOAT_DTYPES and b.dtype != e.dtype
            ):
                problems.append(
                    f"{ck.file_of(n)}: tensor {n!r} has dtype {e.dtype}, not castable to the base's {b.dtype}"
                )
        for n in names:
            if n not in base_names:
                problems.append(f"{ck.file_of(n)}: tensor {n!r} is not in the base")
    collect(problems, InputError, "experts do not match the base")


def plan_shards(base: Checkpoint, out_dtype: torch.dtype | None, shard_size: int) -> list[Shard]:
    """Output layout in base order; a shard holds ≤ shard_size bytes (one bigger tensor alone)."""
    tensors = []
    for name in base.names():
        info = base.info(name)
        merged = info.dtype in FLOAT_DTYPES
        dtype = DTYPE_NAMES[out_dtype] if (merged and out_dtype is not None) else info.dtype
        tensors.append(OutputTensor(name, dtype, info.shape, merged))
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


def inputs_fingerprint(sources: list) -> dict:
    """File sizes and header digests of every input file (adapters: their config digest too)."""
    doc: dict = {}
    for src in sources:
        doc.update(src.fingerprint())
    return doc


def _file_state(paths: list[str]) -> dict[str, tuple[int, int]]:
    state = {}
    for f in paths:
        try:
            st = os.stat(f)
        except OSError:
            state[f] = (-1, -1)
            continue
        state[f] = (st.st_size, st.st_mtime_ns)
    return state


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
            raise NonFiniteError(
                f"{self.ckpts[i].file_of(self.name)}: the adapter of {self.name!r} contains NaN or Inf (pass --allow-nonfinite to merge it anyway)"
            )
        return f

    def _checked(self, i: int, t: torch.Tensor) -> torch.Tensor:
        if self.check_finite and not all_finite(t):
            raise NonFiniteError(
                f"{self.ckpts[i].file_of(self.name)}: tensor {self.name!r} contains NaN or Inf "
                "(pass --allow-nonfinite to merge it anyway)"
            )
        return t


class ExpertRows:
    """The experts of one row block, indexed like LazyExperts (statistics passes)."""

    def __init__(self, experts: LazyExperts, rows: tuple[int, int] | None):
        self.experts, self.r = experts, rows

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.experts[i] if self.r is None else self.experts.rows(i, *self.r)

    def factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.experts.factors(i)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C: the current shard is abandoned cleanly, the merge resumable."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class MergeReport:
    out: str
    shards: int
    shards_resumed: int
    bytes_written: int
    seconds: float
    device: str
    planned_peak_ram: int = 0
    measured_peak_ram: int = 0  # anonymous memory, sampled
    bytes_read_ahead: int = 0
    read_throughput: float = 0.0  # bytes/s of the read-ahead thread


class _Progress:
    """The merge's progress bar: output bytes done, and the rate at which inputs are consumed."""

    def __init__(self, bar):
        self.bar, self.consumed, self.started = bar, 0, time.monotonic()

    def skip(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def done(self, out_bytes: int, read_bytes: int) -> None:
        self.bar.update(out_bytes)
        self.consumed += read_bytes
        self.bar.set_postfix_str(
            f"inputs {self.consumed / max(time.monotonic() - self.started, 1e-9) / 1e6:.0f} MB/s", refresh=False
        )


def check_unchanged(input_paths: list[str], initial_state: dict[str, tuple[int, int]]) -> None:
    """Refuse to go on once an input file changed under the merge."""
    if _file_state(input_paths) != initial_state:
        changed = next(p for p in input_paths if _file_state([p]) != {p: initial_state[p]})
        raise InputError(
            f"{changed}: changed during the merge; the shards merged from the old contents no longer match — rerun with --restart"
        )


class Merger:
    """One merge run of a validated recipe."""

    def __init__(
        self,
        recipe: Recipe,
        device: str = "auto",
        restart: bool = False,
        quiet: bool = False,
        max_ram: int | None = None,
        max_gpu_memory: int | None = None,
        checkpoint_seconds: float = 10.0,
        assume_gpu: int | None = None,
        report: str | None = None,
        ray: str | None = None,
        ray_threads: int = 1,
    ):
        self.recipe = recipe
        self.ray, self.ray_threads = (
            ray,
            ray_threads,
        )  # a Ray cluster merges the shards (distributed.py): local, auto or an address
        if ray is not None and report is not None:  # refused before anything is written
            raise UsageError("--report records diagnostics in one process: merge without --ray to write it")
        self.report = None
        if report is not None:
            from .report import ReportWriter

            self.report = ReportWriter(report)
        self.budgets = {
            "max_ram": max_ram,
            "max_gpu_memory": max_gpu_memory,
        }  # as given: a Ray task plans with the driver's
        self.assume_gpu = assume_gpu  # plan only: as if a CUDA device with this much free memory were present
        if max_ram is not None:
            # an explicit budget is a promise: keep allocator slack out of it (costs some speed
            # on models made of many mid-sized tensors, so only when asked)
            return_freed_memory_to_os()
        self.method, self.params = recipe.validate()
        self.device = torch.device("cuda") if assume_gpu else resolve_device(device)
        if self.device.type == "cuda" and getattr(self.params, "precision", None) == "auto":
            self.params = dataclasses.replace(
                self.params, precision="float32"
            )  # float64 is 32–64× slower on consumer GPUs
        self.restart = restart
        self.quiet = quiet
        self.checkpoint_seconds = checkpoint_seconds  # how often progress inside a shard is made durable
        self.compute_dtype = parse_dtype(recipe.compute_dtype, "compute_dtype")
        self.out_dtype = parse_dtype(recipe.dtype, "dtype")
        self.sources, self.stacked_layers, stacked = {}, None, None
        if recipe.slices is not None:  # the stacked model, and which source tensor each output tensor is
            from .io.sliced import open_sliced

            stacked, self.sources, self.stacked_layers = open_sliced(recipe.slices, recipe.base)
        self.base, self.experts = open_inputs(recipe, stacked)
        check_compatible(self.base, self.experts)
        self.shards = plan_shards(self.base, self.out_dtype, recipe.shard_size)
        self.n_layers = settings.count_layers(self.base.names())
        self._values: dict[str, TensorValues] = {}  # per tensor: gradients and filters resolved
        for shard in self.shards:
            for t in shard.tensors:
                if t.merged:
                    self._values[t.name] = self._resolve(t.name)
        self.oft_path = self.method.name == "orthomerge" and all(isinstance(e, OftExpert) for e in self.experts)
        if self.oft_path:
            check_oft_conventions(self.experts)  # type: ignore[arg-type]
        self._check_config()
        tokenizer_donor(recipe)  # a tokenizer_source that cannot serve is refused before merging
        self.plan = self.make_plan(max_ram, max_gpu_memory)
        self._placement = {t.name: t for t in self.plan.tensors}

    def _resolve(self, name: str) -> TensorValues:
        source = self.sources.get(name)
        if source is not None:  # a stacked layer: settings read with its source's name and place in its slice
            _, values = self.recipe.method_and_values(source.name, source.t)
            scale = settings.resolve([*source.levels, self.recipe.parameters.get("scale")], source.name, source.t)
            return dataclasses.replace(values, params=dataclasses.replace(values.params, scale=scale))
        _, values = self.recipe.method_and_values(name, settings.layer_fraction(name, self.n_layers))
        if self.device.type == "cuda" and getattr(values.params, "precision", None) == "auto":
            values = dataclasses.replace(values, params=dataclasses.replace(values.params, precision="float32"))
        return values

    def make_plan(self, max_ram: int | None, max_gpu_memory: int | None, statistics: dict | None = None) -> Plan:
        """Device and peak memory of every tensor under the budgets (see plan.py); `statistics`:
        what a plan_statistics method measured (then its tensors' needs are measured, not bounds)."""
        use_gpu = self.device.type == "cuda"
        if self.assume_gpu:
            gpu_budget = min(max_gpu_memory or self.assume_gpu, self.assume_gpu)
        else:
            gpu_budget = (max_gpu_memory or default_gpu_budget()) if use_gpu else None
        ram_budget = max_ram or default_ram_budget()
        itemsize = torch.empty((), dtype=self.compute_dtype).element_size()
        n = len(self.experts)
        tensors = []
        previous_out = 0
        for shard in self.shards:
            for t in shard.tensors:
                base_bytes = self.base.info(t.name).nbytes
                if not t.merged:  # copied from the base: the experts' copies are not read
                    tensors.append(
                        TensorPlan(t.name, t.shape, "copy", 0, 2 * base_bytes + previous_out, base_bytes, t.nbytes)
                    )
                    previous_out = t.nbytes
                    continue
                read = base_bytes + sum(e.info(t.name).nbytes for e in self.experts if isinstance(e, Checkpoint))
                measured = statistics.get(t.name) if statistics else None
                need = (
                    self.method.memory(t.name, t.shape, n, self._values[t.name].params, itemsize)
                    if measured is None
                    else self.method.memory(
                        t.name, t.shape, n, self._values[t.name].params, itemsize, statistics=measured
                    )
                )
                numel = math.prod(t.shape)
                # the result is held until written; the writer thread may still be writing the previous one
                device, gpu_bytes, host_bytes, note = place(
                    need, numel, itemsize, use_gpu, gpu_budget, t.nbytes + previous_out
                )
                previous_out = t.nbytes
                tensors.append(TensorPlan(t.name, t.shape, device, gpu_bytes, host_bytes, read, t.nbytes, note))
        passes = 0 if self.method.plan_statistics else self.method.statistics_passes(self.params)
        plan = Plan(
            tensors,
            rss_anon(),
            ram_budget,
            gpu_budget,
            free_disk(self.recipe.out),
            sum(s.nbytes for s in self.shards),
            passes,
        )
        if statistics and self.method.plan_statistics:
            plan.statistics_read = sum(t.read_bytes for t in tensors if t.name in statistics)
        elif self.measures_plan():
            plan.notes.append(
                f"{self.method.name}: upper bounds where the working set depends on the data "
                "(plan --measure measures them; a merge does when the bounds do not fit)"
            )
        plan.spilled = [t for t in tensors if t.note]
        return plan

    # config.json keys that must agree between the base and a full-model expert: tensors of the
    # same shapes can still belong to another architecture or layer/vocabulary layout
    ARCHITECTURE_KEYS = (
        "model_type",
        "architectures",
        "num_hidden_layers",
        "hidden_size",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
    )

    def _check_config(self) -> None:
        for name in ("config.json", "generation_config.json"):
            path = os.path.join(self.base.folder, name)
            if os.path.exists(path) and not isinstance(load_json(path), dict):
                raise InputError(f"{path}: not a JSON object")
        base_path = os.path.join(self.base.folder, "config.json")
        base_config = load_json(base_path) if os.path.exists(base_path) else None
        problems = []
        for e in self.experts:
            if not isinstance(e, Checkpoint):
                continue  # adapters: adapter_config.json is checked when they are opened
            path = os.path.join(e.folder, "config.json")
            if not os.path.exists(path):
                continue
            config = load_json(path)
            if not isinstance(config, dict):
                problems.append(f"{path}: not a JSON object")
                continue
            if base_config is None:
                continue
            for key in self.ARCHITECTURE_KEYS:
                if key in base_config and key in config and config[key] != base_config[key]:
                    problems.append(f"{path}: {key} is {config[key]!r}, the base's {base_config[key]!r}")
        collect(problems, InputError, "experts' config.json do not match the base")

    # -- fingerprint and resume ------------------------------------------------------------
    def _fingerprint(self) -> tuple[str, dict, dict]:
        recipe_doc = self.recipe.fingerprint_doc() | {"device_type": self.device.type}
        inputs = inputs_fingerprint([self.base, *self.experts])
        blob = json.dumps({"recipe": recipe_doc, "inputs": inputs}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest(), recipe_doc, inputs

    def _prepare_output(self) -> Journal:
        out = self.recipe.out
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, ".streammerge-probe" + TMP_SUFFIX)
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as exc:
            raise os_error(exc, out) from None
        fingerprint, recipe_doc, inputs = self._fingerprint()
        jpath = journal_path(out)
        names = [s.filename for s in self.shards]
        if os.path.exists(jpath):
            old = Journal.load(jpath)
            if old.fingerprint != fingerprint or old.shards != names:
                if not self.restart:
                    raise ResumeError(
                        f"{out}: holds a merge of a different recipe or different inputs; "
                        "pass --restart to discard it and start over"
                    )
                self._clear_output(old)
            else:
                keep = os.path.basename(temp_name(os.path.join(out, old.partial["shard"]))) if old.partial else None
                for tmp in os.listdir(out):
                    if tmp.endswith(TMP_SUFFIX) and tmp != keep:
                        os.remove(os.path.join(out, tmp))
                old.finished = {
                    n: v
                    for n, v in old.finished.items()
                    if os.path.isfile(os.path.join(out, n)) and os.path.getsize(os.path.join(out, n)) == v["size"]
                }
                self.reuse_placement(old.placement)
                return old
        else:
            foreign = [f for f in os.listdir(out) if not f.endswith(TMP_SUFFIX) and f != PID_NAME]
            if foreign:
                raise ResumeError(
                    f"{out}: not empty and not a streammerge output ({foreign[0]!r} ...); choose another folder"
                )
        journal = Journal(jpath, fingerprint, recipe_doc, inputs, names)
        journal.placement = {t.name: t.device for t in self.plan.tensors if t.device != "copy"}
        journal.save()
        return journal

    def measures_plan(self) -> bool:
        """Whether this merge's plan has upper bounds a statistics pass can make tight."""
        return self.method.plan_statistics and bool(self.method.statistics_passes(self.params)) and not self.oft_path

    def measure_statistics(self):
        """The pass a plan_statistics method needs (OrthoMerge-C: conflicting rows of wide weights)."""
        return self.method.statistics(self._map_pass, len(self.experts), self.params, None)

    def plan_with(self, statistics) -> None:
        self.plan = self.make_plan(self.budgets["max_ram"], self.budgets["max_gpu_memory"], statistics)
        self._placement = {t.name: t for t in self.plan.tensors}

    def _tighten_plan(self, journal: Journal) -> None:
        """Where the upper-bound plan does not fit (RAM, or a tensor spilled off the GPU), measure
        what the working sets depend on, once (journalled: a resume plans the same), and replan."""
        if not self.measures_plan():
            return
        fresh = journal.statistics is None
        if fresh:
            if self.plan.peak_host <= self.plan.ram_budget and not self.plan.spilled:
                return
            log.info(
                "the plan's upper bounds need %s of RAM%s: measuring the data-dependent working sets (one read of those tensors)",
                format_size(self.plan.peak_host),
                f" and spill {len(self.plan.spilled)} tensor(s) to the CPU" if self.plan.spilled else "",
            )
            journal.statistics = self.measure_statistics()
        self.plan_with(journal.statistics)
        if fresh:  # the counts and the placement they give, together
            journal.placement = self.placement_devices()
            journal.save()
        else:
            self.reuse_placement(journal.placement)

    def merge_statistics(self, journal: Journal):
        """What the merge itself reads from the journal's statistics (plan-only ones: nothing)."""
        return None if self.method.plan_statistics else journal.statistics

    def placement_of(self, name: str) -> TensorPlan:
        return self._placement[name]

    def placement_devices(self) -> dict[str, str]:
        """Where each merged tensor is computed: the journal records it, Ray tasks follow it."""
        return {name: t.device for name, t in self._placement.items() if t.device != "copy"}

    def reuse_placement(self, recorded: dict[str, str]) -> None:
        """A resumed merge (or a Ray task) computes every tensor where the first run (the driver's
        plan) did: byte-identical output."""
        for name, device in recorded.items():
            placed = self._placement.get(name)
            if placed is None or placed.device == device:
                continue
            if device == "cuda" and not torch.cuda.is_available():
                raise ResourceError(
                    f"{self.recipe.out}: this merge started on a GPU; resume it where CUDA is available (or pass --restart)"
                )
            log.info("%s: computed on %s as in the first run (the plan now says %s)", name, device, placed.device)
            self._placement[name] = dataclasses.replace(placed, device=device)

    def _clear_output(self, old: Journal) -> None:
        out = self.recipe.out
        ours = set(old.shards) | {INDEX_NAME, CARD_NAME, *CONFIG_FILES, *TOKENIZER_FILES}
        for f in os.listdir(out):
            if f in ours or f.endswith(TMP_SUFFIX):
                os.remove(os.path.join(out, f))
        os.remove(old.path)
        log.info("--restart: removed the previous merge in %s", out)

    # -- passes ------------------------------------------------------------------------------
    def _device_of(self, name: str) -> torch.device:
        if self.assume_gpu:  # planning for a GPU that is not here: `plan --measure` reads on the CPU
            return torch.device("cpu")
        placed = self._placement.get(name)
        return (
            torch.device(placed.device)
            if placed is not None and placed.device in ("cuda", "cpu")
            else torch.device("cpu")
        )

    @property
    def _check_inputs(self) -> bool:
        """Check every input as it is loaded (else: the result, then the inputs if it is not finite)."""
        return not self.recipe.allow_nonfinite and not self.method.propagates_nonfinite

    def _experts_for(self, name: str) -> LazyExperts:
        return LazyExperts(self.experts, name, self.compute_dtype, self._device_of(name), self._check_inputs)

    def _load_base(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self.base.get(name, self.compute_dtype, self._device_of(name), rows)
        if self._check_inputs and not all_finite(t):
            raise NonFiniteError(
                f"{self.base.file_of(name)}: tensor {name!r} contains NaN or Inf (pass --allow-nonfinite to merge it anyway)"
            )
        return t

    def _task(self, t: OutputTensor, statistics=None) -> TensorTask:
        values = self._values[t.name]
        device = self._device_of(t.name)
        placed = self._placement.get(t.name)
        return TensorTask(
            t.name,
            lambda rows: self._load_base(t.name, rows),
            self._experts_for(t.name),
            values.weights,
            values.densities,
            statistics,
            self.recipe.seed,
            OftGenerators(self.experts, t.name, self.compute_dtype, device) if self.oft_path else None,  # type: ignore[arg-type]
            torch.device("cpu") if placed is not None and device.type == "cuda" and "state" in placed.note else None,
            out_dtype=DTYPES[t.dtype],
            shape=t.shape,
            dtype=self.compute_dtype,
            expert_values=values.experts,
        )

    def _model_densities(self) -> tuple[float | None, ...]:
        """Statistics over the whole model (TIES at model scope) take one density per expert."""
        distinct = {v.densities for v in self._values.values()}
        if len(distinct) > 1:
            raise UsageError("ties scope=model: density must be one value per expert (no gradient or filter)")
        return distinct.pop() if distinct else tuple(None for _ in self.experts)

    def model_blocks(
        self, names: set[str] | None = None, progress: bool = True
    ) -> Iterator[tuple[str, torch.Tensor, ExpertRows]]:
        """A statistics pass over the merged tensors (those in `names`): (name, base rows, experts'
        rows) for every row block."""
        wanted = self.method.statistics_tensors
        merged = [
            t
            for s in self.shards
            for t in s.tensors
            if t.merged
            and (names is None or t.name in names)
            and (wanted is None or wanted(t.name, t.shape, self._values[t.name].params))
        ]
        for t in tqdm(merged, desc="statistics", unit="tensor", disable=self.quiet or not progress, leave=False):
            task = self._task(t)
            for rows in task.row_blocks():
                yield t.name, task.base_rows(rows), ExpertRows(task.experts, rows)  # type: ignore[arg-type]

    def _map_pass(self, fn, *args) -> list:
        """The local MapPass (methods/__init__.py): the whole model in one part."""
        return [fn(self.model_blocks(), *args)]

    def _merge_tensor(self, t: OutputTensor, statistics) -> torch.Tensor:
        if not t.merged:
            return self.base.get(t.name, dtype=None)
        task = self._task(t, statistics)
        if self.report is not None:
            task.diagnostics = {}
        try:
            result = self.method.merge(task, self._values[t.name].params)
        except ValueError as exc:  # a method that cannot merge these inputs says why, with the tensor
            raise InputError(f"tensor {t.name!r}: {self.method.name}: {exc}") from None
        if self.report is not None:
            from .report import generic_stats

            self.report.add(t.name, generic_stats(self._task(t), result) | task.diagnostics)
        if not self.recipe.allow_nonfinite and not all_finite(result):
            for src in (self.base, *self.experts):  # name the input that brought it
                if not all_finite(src.get(t.name, self.compute_dtype)):
                    raise NonFiniteError(
                        f"{src.file_of(t.name)}: tensor {t.name!r} contains NaN or Inf (pass --allow-nonfinite to merge it anyway)"
                    )
            raise NonFiniteError(
                f"merged tensor {t.name!r} has NaN or Inf although its inputs are finite (a bug: please report)"
            )
        # convert, then move: a blocking device-to-host copy would convert on the host, holding a
        # float32 copy of the result in RAM
        return result.to(DTYPES[t.dtype]).to("cpu")

    def run(self) -> MergeReport:
        """Merge (or resume); SIGINT/SIGTERM anywhere leave a resumable state and raise Interrupted."""
        with sigterm_as_interrupt():
            try:
                with PeakSampler() as sampler:
                    report = self._run()
                report.planned_peak_ram = self.plan.peak_host
                report.measured_peak_ram = sampler.peak
                return report
            except KeyboardInterrupt:
                raise Interrupted(
                    "interrupted; the finished shards are kept — rerun the same command to resume"
                ) from None

    def _run(self) -> MergeReport:
        if self.assume_gpu:
            raise UsageError("--assume-gpu plans only; merge on a machine that has the GPU")
        try:
            os.makedirs(self.recipe.out, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, self.recipe.out) from None
        with OutputLock(self.recipe.out):
            return self._run_locked()

    def _run_locked(self) -> MergeReport:
        started = time.monotonic()
        journal = self._prepare_output()
        out = self.recipe.out
        if journal.complete and os.path.exists(os.path.join(out, INDEX_NAME)):
            log.info("%s: already complete", out)
            return MergeReport(out, len(self.shards), len(self.shards), 0, 0.0, self.device.type)
        todo = [s for s in self.shards if s.filename not in journal.finished]
        if todo:
            self._tighten_plan(journal)
        total = sum(s.nbytes for s in self.shards)
        self.plan.disk_needed = sum(s.nbytes for s in todo)
        self.plan.disk_free = free_disk(out)
        self.plan.check()
        for t in self.plan.spilled:
            log.info("%s: %s", t.name, t.note)
        executor = None
        if self.ray is not None:
            from .distributed import RayExecutor

            executor = RayExecutor(self, self.ray, self.ray_threads)
            executor.start()
        try:
            if executor is not None:
                executor.check_resources(todo)  # before any work, as the local plan check
            if (
                self.method.statistics is not None
                and not self.method.plan_statistics
                and self.method.statistics_passes(self.params)
                and journal.statistics is None
                and todo
            ):
                densities = [
                    d if d is not None else getattr(self.params, "density", 1.0) for d in self._model_densities()
                ]
                map_pass = self._map_pass if executor is None else executor.map_pass
                journal.statistics = self.method.statistics(map_pass, len(self.experts), self.params, densities)
                journal.save()
            input_paths = list(inputs_fingerprint([self.base, *self.experts]))
            initial_state = _file_state(input_paths)
            read_ahead = ReadAhead(self.input_ranges(todo) if executor is None else []).start()
            try:
                with tqdm(
                    total=total,
                    initial=total - sum(s.nbytes for s in todo),
                    unit="B",
                    unit_scale=True,
                    desc=f"merging ({self.method.name}, {self.device.type}{', Ray' if executor else ''})",
                    disable=self.quiet,
                    smoothing=0.1,
                ) as bar:
                    if executor is None:
                        written = self._merge_shards(todo, journal, bar, read_ahead, input_paths, initial_state)
                    else:
                        written = executor.merge(
                            todo, journal, _Progress(bar), lambda: check_unchanged(input_paths, initial_state)
                        )
            finally:
                read_ahead.stop()
        finally:
            if executor is not None:
                executor.stop()
        self._finish(journal)
        report = MergeReport(
            out, len(self.shards), len(self.shards) - len(todo), written, time.monotonic() - started, self.device.type
        )
        report.bytes_read_ahead, report.read_throughput = read_ahead.read, read_ahead.throughput()
        return report

    def input_ranges(self, shards: list[Shard]) -> list[tuple[str, int, int]]:
        """(file, offset, length) of every input tensor the remaining shards read, in order."""
        ranges = []
        for shard in shards:
            for t in shard.tensors:
                for src in (self.base, *self.experts) if t.merged else (self.base,):  # copies read the base only
                    if isinstance(src, Checkpoint):
                        info = src.info(t.name)
                        ranges.append((src.file_of(t.name), info.offset, info.nbytes))
        return ranges

    def _merge_shards(self, todo, journal, bar, read_ahead, input_paths, initial_state) -> int:
        written = 0
        progress = _Progress(bar)
        for shard in todo:
            check_unchanged(input_paths, initial_state)
            sha, size = self.write_shard(shard, self.merge_statistics(journal), journal, progress, read_ahead)
            journal.finished[shard.filename] = {"sha256": sha, "size": size}
            journal.partial = None
            journal.save()
            written += size
        return written

    def write_shard(
        self,
        shard: Shard,
        statistics,
        journal: Journal | None = None,
        progress: "_Progress | None" = None,
        read_ahead: ReadAhead | None = None,
        temp_tag: str = "",
    ) -> tuple[str, int]:
        """Merge the tensors of `shard` and write it atomically under its final name; (sha256, size).

        With a journal, progress inside the shard is made durable every `checkpoint_seconds` and a
        recorded partial shard is continued; without one (a Ray task) the shard is written from its
        start to a temporary name of its own (`temp_tag`), so that a retried or orphaned attempt
        never writes into another's file."""
        out = self.recipe.out
        layout = [(t.name, t.dtype, t.shape) for t in shard.tensors]
        partial = (
            journal.partial
            if journal is not None and journal.partial and journal.partial["shard"] == shard.filename
            else None
        )
        resume = (partial["tensors"], partial["offset"]) if partial else None
        with ShardWriter(
            os.path.join(out, shard.filename),
            layout,
            {"format": "pt"},
            resume=resume,
            background=True,
            temp_tag=temp_tag,
        ) as writer:
            writer.keep_on_error = journal is not None  # what a checkpoint made durable survives an interrupt
            done = writer.tensors_written
            if done:
                log.info("%s: resuming after %d of its %d tensors", shard.filename, done, len(shard.tensors))
                if progress is not None:
                    progress.skip(sum(t.nbytes for t in shard.tensors[:done]))
                if read_ahead is not None:
                    read_ahead.advance(sum(self._placement[t.name].read_bytes for t in shard.tensors[:done]))
            last_checkpoint = time.monotonic()
            for t in shard.tensors[done:]:
                writer.write(t.name, self._merge_tensor(t, statistics))
                if read_ahead is not None:
                    read_ahead.advance(self._placement[t.name].read_bytes)
                if progress is not None:
                    progress.done(t.nbytes, self._placement[t.name].read_bytes)
                if (
                    journal is not None
                    and time.monotonic() - last_checkpoint >= self.checkpoint_seconds
                    and writer.tensors_written < len(layout)
                ):
                    journal.partial = {
                        "shard": shard.filename,
                        "tensors": writer.tensors_written,
                        "offset": writer.checkpoint(),
                    }
                    journal.save()
                    last_checkpoint = time.monotonic()
            return writer.commit()

    def _finish(self, journal: Journal) -> None:
        out = self.recipe.out
        copy_model_files(self.recipe, out)
        write_card(self.recipe, out)
        if (self.out_dtype is not None or self.stacked_layers is not None) and os.path.isfile(
            os.path.join(out, "config.json")
        ):
            config = load_json(os.path.join(out, "config.json"))
            if self.out_dtype is not None:
                config["torch_dtype"] = str(self.out_dtype).removeprefix("torch.")
            if self.stacked_layers is not None:
                config["num_hidden_layers"] = self.stacked_layers
            write_bytes_atomic(os.path.join(out, "config.json"), (json.dumps(config, indent=2) + "\n").encode())
        if self.report is not None:
            self.report.finish(
                {"method": self.method.name, "experts": len(self.experts), "recipe": journal.recipe},
                [t.name for s in self.shards for t in s.tensors if t.merged],
            )
        journal.complete = True
        journal.save()
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in self.shards), "merged_by": "streammerge"},
            "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
        }
        write_bytes_atomic(os.path.join(out, INDEX_NAME), (json.dumps(index, indent=2) + "\n").encode())

    def close(self) -> None:
        for ck in [self.base, *self.experts]:
            ck.close()
