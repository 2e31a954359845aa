"""The method contract: what a merge method receives (`TensorTask`) and declares (`Method`), and
the helpers methods share.

A method is pure tensor code over one weight name at a time. It receives a `TensorTask`:
the base tensor (compute dtype, on the compute device) and `experts`, a lazy sequence where
`experts[i]` loads expert i's tensor from its memory map. A method streams simply by
indexing experts one at a time, as many passes as it needs (task arithmetic: one; TIES: sign
election then disjoint mean; conflict-aware OrthoMerge: τ_mean then Procrustes), so at most
one expert tensor plus the method's accumulators is alive. `memory` states the peak bytes
for the planner (plan.py). A method that needs statistics over each expert's whole model (TIES at
model scope) declares `statistics`, run by the engine as passes over the model before
merging, each a map over the model's tensors (`MapPass`: locally one call over all of them, on
Ray one task per output shard) whose partial results the method reduces; its JSON-able result is
journalled so a resumed merge does not recompute it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Protocol

import torch

from ..errors import UsageError, did_you_mean
from ..plan import Need


REQUIRED = object()  # an expert parameter without a default
Rows = tuple[int, int]  # rows [start, stop) along dim 0: a row block

# Row blocks: methods whose arithmetic is row-local (task arithmetic, linear, TIES, DARE) stream
# a large tensor in blocks of at most this many elements, so their working set is a few blocks
# plus the output, never several copies of a 128k-vocabulary embedding. Results do not depend
# on the block size (every formula is elementwise, thresholds are exact, DARE's generator runs on
# across blocks), so it is an engineering constant, not part of a recipe.
BLOCK_ELEMENTS = 1 << 22


class ExpertTensors(Protocol):
    """Lazy per-expert tensors for one weight name; each access loads (and copies) anew.
    Sources that can also load a row block define `rows(i, start, stop)`."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> torch.Tensor: ...


class TensorTask:
    """One weight name to merge: the base (a tensor, or a loader `rows -> tensor` called with
    None for the whole tensor), the lazy experts, and the recipe's per-expert values.

    `base` is the whole base tensor, loaded on first use; `row_blocks()`, `base_rows(r)` and
    `task_vector(i, r)` serve methods that stream in row blocks; `new_output()` is the result
    tensor (host memory, the output dtype) that such methods fill block by block."""

    def __init__(
        self,
        name: str,
        base,
        experts: ExpertTensors,
        weights: tuple[float, ...],
        densities: tuple[float | None, ...] = (),
        statistics: Any = None,
        seed: int = 0,
        generators: Any = None,
        state_device: Any = None,
        out_dtype: torch.dtype | None = None,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype = torch.float32,
        expert_values: tuple[dict[str, Any], ...] = (),
    ):
        self.name = name
        self.expert_values = expert_values or tuple(
            {"weight": w} for w in weights
        )  # each expert's resolved values (Method.expert_params)
        self.diagnostics: dict[str, Any] | None = None  # set by the engine under --report: what explains this merge
        self.progress: Callable[[float], None] | None = None  # set by the engine: the fraction of this tensor done
        # set by the engine where every input is a stored checkpoint: stored(i, rows) is expert i's
        # tensor (the base's for i = None) as stored, in its file's dtype, for a method that widens it;
        # read-only: it may be the input file's mapped bytes
        self.stored: Callable[[int | None, Rows | None], torch.Tensor] | None = None
        self.experts = experts
        self.weights = weights
        self.densities = densities  # per-expert override, None: the method's own
        self.statistics = statistics  # what the method's `statistics` returned, if it has one
        self.seed = seed
        self.generators = generators  # OFT experts only: per-expert generator blocks (io.peft_oft.OftGenerators)
        self.state_device = state_device  # where per-expert state goes (the plan may keep it in host RAM)
        self.out_dtype = out_dtype  # dtype of new_output() (None: the compute dtype)
        self._base_block: tuple[Rows, torch.Tensor] | None = None
        self._output: torch.Tensor | None = None  # new_output()
        # set by the engine where the plan counted Need.side_by_side: the method may compute two
        # experts at once on the CPU (each on one thread, where it has two or more)
        self.side_by_side = False
        self.vouched_finite = False  # set by map_row_blocks: every block written in place (store_into)
        if isinstance(base, torch.Tensor):
            self._base, self._load_base, self.shape, self.dtype = base, None, tuple(base.shape), base.dtype
        else:
            assert shape is not None, "a base loader needs the shape"
            self._base, self._load_base, self.shape, self.dtype = (
                None,
                base,
                tuple(shape),
                dtype,
            )  # dtype: the compute dtype

    @property
    def base(self) -> torch.Tensor:
        if self._base is None:
            self._base = self._load_base(None)
        return self._base

    def base_rows(self, rows: Rows | None) -> torch.Tensor:
        """The base's rows (read-only: callers never write into it). The last block loaded is
        kept, since a method reads the same base block once per expert."""
        if rows is None:
            return self.base
        if self._base is not None:
            return self._base[rows[0] : rows[1]]
        if self._base_block is None or self._base_block[0] != rows:
            self._base_block = None  # free the previous block before loading the next
            self._base_block = (rows, self._load_base(rows))
        return self._base_block[1]

    def expert_rows(self, i: int, rows: Rows | None) -> torch.Tensor:
        if rows is None:
            return self.experts[i]
        return self.experts.rows(i, rows[0], rows[1])  # type: ignore[attr-defined]

    def task_vector(self, i: int, rows: Rows | None = None) -> torch.Tensor:
        """τ_i = W_i − W_0 (of rows `rows` only, if given), in the compute dtype."""
        return self.expert_rows(i, rows).sub_(self.base_rows(rows))

    def advance(self, done: int, total: int) -> None:
        """Say how far a long merge of this tensor has come (`done` of `total` steps), so that the
        progress bar moves inside a tensor that takes minutes (a no-op unless the engine listens)."""
        if self.progress is not None and total > 0:
            self.progress(min(done / total, 1.0))

    def note(self, key: str, value: Any) -> None:
        """Record a diagnostic for `streammerge report` (a no-op unless --report is given)."""
        if self.diagnostics is not None:
            self.diagnostics[key] = value

    @property
    def store_dtype(self) -> torch.dtype | None:
        """The dtype a kernel may write the result in at once (the output's), or None: keep the
        compute dtype. Not under --report, whose statistics describe the result before it is
        stored."""
        return self.out_dtype if self.diagnostics is None else None

    def task_factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """τ_i as low-rank factors (B', A'), τ_i = B' A', when expert i is a LoRA adapter; None
        otherwise (then use task_vector)."""
        get = getattr(self.experts, "factors", None)
        return None if get is None else get(i)

    def row_blocks(self, max_elements: int | None = None) -> list[Rows | None]:
        """The row blocks a streaming method visits in order; [None] (the whole tensor at once)
        for scalars, small tensors and experts that cannot load rows."""
        if not hasattr(self.experts, "rows"):
            return [None]
        return row_blocks(self.shape, max_elements)

    def new_output(self, like: torch.Tensor) -> torch.Tensor:
        """The result tensor, filled block by block with `out[r0:r1].copy_(block)`; made once, on
        the first call (or store_into's)."""
        if self._output is None:
            self._output = torch.empty(
                self.shape, dtype=self.out_dtype or like.dtype, device="cpu" if self.out_dtype else like.device
            )
        return self._output

    def store_into(self, rows: Rows | None) -> torch.Tensor | None:
        """Rows `rows` of the result tensor (new_output), for a kernel that writes them rounded to the
        output dtype at once (store_dtype), or None: return the compute dtype. A method that returns
        this view itself vouches that every entry is finite (the kernels count the entries that are
        not and return float32 then): map_row_blocks sets `vouched_finite`, and the engine does
        not check those bytes again (a pass over the whole result: 5-6 % of a task-arithmetic merge)."""
        if self.store_dtype is None:
            return None
        out = self.new_output(torch.empty(0, dtype=self.store_dtype))
        return out if rows is None else out[rows[0] : rows[1]]

    def written_in_place(self, block: torch.Tensor, rows: Rows | None) -> bool:
        """Whether `block` is store_into(rows) itself: the result's own rows, written by a kernel."""
        if self._output is None:
            return False
        dest = self._output if rows is None else self._output[rows[0] : rows[1]]
        return block.data_ptr() == dest.data_ptr() and block.shape == dest.shape and block.dtype == dest.dtype

    def rng(self, i: int) -> torch.Generator:
        """A CPU generator seeded by (seed, tensor name, expert index): reproducible anywhere."""
        key = f"{self.seed}\x00{self.name}\x00{i}".encode()
        g = torch.Generator(device="cpu")
        g.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1))
        return g


def row_blocks(shape: tuple[int, ...], max_elements: int | None = None) -> list[Rows | None]:
    """Row blocks of at most `max_elements` (BLOCK_ELEMENTS) entries (one row where a row is
    longer) along dim 0, in order; [None] (the whole tensor) for scalars and smaller tensors."""
    max_elements = max_elements or BLOCK_ELEMENTS
    numel = math.prod(shape)
    if not shape or numel <= max_elements:
        return [None]
    row = max(1, numel // shape[0])
    step = max(1, max_elements // row)
    return [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


def ordered_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ of all of x with the same bits on any CPU thread count. torch sums a large tensor to one
    value in as many pieces as it has threads (a 30M-element float32 sum differs between one and
    two threads; math/lapack.py says why that matters); sums along the rows of a matrix run one
    row per thread. So: rows of 1024, then rows of their sums, until a few thousand values remain,
    which torch sums on one thread."""
    x = x.reshape(-1)
    while x.numel() > 4096:
        pad = (-x.numel()) % 1024
        if pad:
            x = torch.cat([x, x.new_zeros(pad)])
        x = x.reshape(-1, 1024).sum(dim=1)
    return x.sum()


def holds_whole(task: TensorTask, n: int, limit: int) -> bool:
    """Whether a method keeps the N per-expert copies of this tensor whole: it is one row block,
    or the N copies in the compute dtype fit `limit` bytes (above it: passes over row blocks)."""
    itemsize = torch.empty((), dtype=task.dtype).element_size()
    return len(task.row_blocks()) == 1 or n * math.prod(task.shape) * itemsize <= limit


def map_row_blocks(task: TensorTask, merge_block: Callable[[Rows | None], torch.Tensor]) -> torch.Tensor:
    """The result of a row-local method: `merge_block(rows)` for each row block in order, gathered
    into `task.new_output` (or returned as it is when the tensor is one block). A block that is
    already the output's rows (TensorTask.store_into) is not copied."""
    blocks = task.row_blocks()
    if blocks == [None]:
        block = merge_block(None)
        task.vouched_finite = task.written_in_place(block, None)
        return block
    out, in_place = None, 0
    for j, rows in enumerate(blocks):
        block = merge_block(rows)
        task.advance(j + 1, len(blocks))
        out = task.new_output(block)
        if task.written_in_place(block, rows):
            in_place += 1
        else:
            out[rows[0] : rows[1]].copy_(block)  # type: ignore[index]
        del block
    task.vouched_finite = in_place == len(blocks)
    return out  # type: ignore[return-value]


def elementwise_memory_blocks(buffers: float, cached: float = 0.0) -> Callable[..., Any]:
    """Peak of a row-block method: `buffers` compute-dtype blocks alive at once (the output is
    counted by the planner), plus `cached` compute-dtype copies of the whole tensor."""

    def memory(name: str, shape: tuple[int, ...], n_experts: int, params: Any, itemsize: int) -> Need:
        numel = math.prod(shape)
        block = min(numel, BLOCK_ELEMENTS) if shape else numel
        return Need(int(buffers * block * itemsize + cached * numel * itemsize), transfer=block)

    return memory


def whole_tensor_memory(copies: float, per_expert: float = 0.0) -> Callable[..., Any]:
    """Peak of a method that holds whole tensors: `copies` compute-dtype copies of the tensor,
    plus `per_expert` more per expert."""

    def memory(name: str, shape: tuple[int, ...], n_experts: int, params: Any, itemsize: int) -> Need:
        return Need(int((copies + per_expert * n_experts) * math.prod(shape) * itemsize))

    return memory


# One pass over (part of) the model: (name, base, experts) for each row block of each mergeable tensor.
ModelBlocks = Iterator[tuple[str, torch.Tensor, ExpertTensors]]
# map_pass(fn, *args): [fn(blocks, *args) for each part of the model], in the model's order; fn is
# a module-level function (it may run in another process) and its results are reduced exactly
# (integer sums), so how the model is cut into parts cannot change the statistics.
MapPass = Callable[..., list]


@dataclass(frozen=True)
class Cost:
    """The dominant work of one tensor's merge, for the time estimate of `streammerge plan`:
    elementwise passes over the N inputs, matrix-product flops, and factorisations (SVD, eigh)
    counted as Σ m·n·min(m, n)."""

    passes: float = 3.0
    flops: float = 0.0
    factorisation: float = 0.0
    paired: float = 0.0  # of `factorisation`: per-expert solves that may run two at a time (side_by_side)


@dataclass(frozen=True)
class Method:
    name: str
    params_type: type
    merge: Callable[[TensorTask, Any], torch.Tensor]
    memory: Callable[
        [str, tuple[int, ...], int, Any, int], Any
    ]  # (name, shape, n_experts, params, itemsize) -> plan.Need
    # (map_pass, n_experts, params, model_values): model_values holds each expert's values named
    # in `statistics_values`, one per expert for the whole model (None for a plan-only pass)
    statistics: Callable[[MapPass, int, Any, Any], Any] | None = None
    statistics_passes: Callable[[Any], int] = field(default=lambda params: 0)
    # Statistics that only make the memory plan tight (OrthoMerge-C: conflicting rows): the pass
    # runs when the plan from `memory`'s upper bounds does not fit, and `memory` then takes them
    # as `statistics=` (this tensor's entry). `statistics_tensors(name, shape, params)`: which
    # tensors such a pass reads (None: every merged tensor).
    plan_statistics: bool = False
    statistics_tensors: Callable[[str, tuple[int, ...], Any], bool] | None = None
    doc: str = ""
    # True where NaN/Inf in any input always reaches the result (sums, products, masks: NaN·0 is
    # NaN): the engine then checks the result only, and looks for the culprit input if it is
    # not finite — one pass over each result instead of one over every input.
    propagates_nonfinite: bool = False
    # Values each expert has (resolved per tensor from the expert's entry, then the recipe's
    # parameter of that name) with their defaults; REQUIRED: no default, as in mergekit.
    expert_params: dict[str, Any] = field(default_factory=lambda: {"weight": 1.0})
    min_experts: int = 1
    max_experts: int | None = None  # checked with the recipe, before any input is opened
    # Per-expert values a whole-model statistics pass takes (TIES at model scope: density); the
    # engine refuses a gradient or filter on them, before anything is written.
    statistics_values: tuple[str, ...] = ()
    # The method merges OFT experts' stored generators when every expert is an OFT adapter
    # (OrthoMerge, section 3.2): the engine then hands each task the generators, and plans each
    # tensor with these in place of `memory` and `cost`, given its io.peft_oft.OftGenerators (their
    # block geometry): (name, shape, n_experts, params, itemsize, generators) -> plan.Need, and
    # (name, shape, n_experts, params, generators) -> Cost
    merges_generators: bool = False
    generators_memory: Callable[..., Any] | None = None
    generators_cost: Callable[..., Any] | None = None
    # The parameters as they run on a device kind ("cpu", "cuda"): e.g. precision "auto" → float32
    # on a GPU, where float64 is 32–64× slower.
    for_device: Callable[[Any, str], Any] = field(default=lambda params, device_type: params)
    # Checks of the experts' values against the parameters that need no tensor (raise ValueError).
    check_experts: Callable[[Any, tuple[dict[str, Any], ...]], None] = field(default=lambda params, experts: None)
    # What to say of an unknown parameter that belongs elsewhere (its dataclass field name: `lambda_`)
    param_hints: dict[str, str] = field(default_factory=dict)
    # Its peak where every input of a tensor is stored in bf16 and read as stored on the CPU by the
    # fused kernels (float32 arithmetic): (name, shape, n_experts, params, in_place) -> plan.Need, or
    # None where these parameters take the float32 code (then `memory` holds); in_place: the result
    # may be written in the output's own rows (TensorTask.store_into: a bf16 output, no --report)
    stored_memory: Callable[[str, tuple[int, ...], int, Any, bool], Any] | None = None
    # True where, every input being a stored checkpoint, the method reads each input's row blocks
    # (TensorTask.row_blocks) once and in order, holding no view of one past its release: the
    # engine may then read those blocks ahead into reused buffers (engine/reads.py).
    # (params, each expert's values) -> bool
    reads_once: Callable[[Any, tuple[dict[str, Any], ...]], bool] = field(default=lambda params, experts: False)
    # The numba kernels (math/fused.py) its merge calls, (params, stored: inputs read as stored) ->
    # their names; None where it calls none. A plan asks numba's cache for them, and says where
    # numba is missing.
    kernels: Callable[[Any, bool], tuple[str, ...]] | None = None
    # Its work per tensor, (name, shape, n_experts, params) -> Cost (default: a few elementwise passes)
    cost: Callable[[str, tuple[int, ...], int, Any], Cost] = field(default=lambda name, shape, n, params: Cost())

    def whole_model_statistics(self, params: Any) -> bool:
        """Whether merging needs statistics passes over the whole model first."""
        return self.statistics is not None and not self.plan_statistics and bool(self.statistics_passes(params))

    @property
    def literal_params(self) -> set[str]:
        """Parameters whose value is itself a list or mapping (orthomerge's `exclude`, `residual`):
        taken as written, never read as a gradient or filter list."""
        out = set()
        for f in fields(self.params_type):
            default = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
            if isinstance(default, (list, tuple, dict)):
                out.add(f.name.rstrip("_"))
        return out

    @property
    def shared_params(self) -> set[str]:
        """Parameter names of the method itself (its params dataclass; `lambda` for `lambda_`)."""
        return {f.name.rstrip("_") for f in fields(self.params_type)}


# what a parameter's annotation admits, and how a message names it
SCALAR_TYPES = {
    "float": ((int, float), "a number"),
    "int": ((int,), "a whole number"),
    "bool": ((bool,), "true or false"),  # 0 and 1 too, as YAML writers use them
    "str": ((str,), "a string"),
}


def param_kind(params_type: type, key: str) -> str | None:
    """The scalar type (float, int, bool, str) of a method's parameter, None for any other
    annotation or an unknown key (build_params reports those)."""
    name = "lambda_" if key == "lambda" else key
    for f in fields(params_type):
        if f.name == name:
            options = [a.strip() for a in str(f.type).split("|") if a.strip() != "None"]
            return options[0] if len(options) == 1 and options[0] in SCALAR_TYPES else None
    return None


def check_type(what: str, value: Any, annotation: Any) -> None:
    """Refuse a value its parameter's type does not admit, naming the parameter and the type
    (a string where a number belongs would otherwise fail deep inside a method)."""
    options = [a.strip() for a in str(annotation).split("|")]
    if value is None and "None" in options:
        return
    allowed = [SCALAR_TYPES[o] for o in options if o in SCALAR_TYPES]
    if len(allowed) != len([o for o in options if o != "None"]):
        return  # a container or other annotation: the dataclass checks it
    ok = any(isinstance(value, types) and not (isinstance(value, bool) and bool not in types) for types, _ in allowed)
    ok = ok or ("bool" in options and not isinstance(value, bool) and value in (0, 1))
    if not ok:
        names = " or ".join(name for _, name in allowed) + (" or null" if "None" in options else "")
        raise UsageError(f"{what} must be {names}, not {value!r}")


def build_params(params_type: type, values: dict[str, Any], where: str, hints: dict[str, str] | None = None) -> Any:
    """Instantiate a frozen params dataclass from a dict, refusing unknown keys; `hints`: what to
    say of an unknown key that belongs elsewhere (Method.param_hints)."""
    # `lambda` is a Python keyword: the dataclass field is `lambda_`.
    values = {("lambda_" if k == "lambda" else k): v for k, v in values.items()}
    known = {f.name for f in fields(params_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        shown = sorted(k.rstrip("_") for k in known)
        hint = "".join(f"; {text}" for key, text in (hints or {}).items() if key in unknown)
        guess = did_you_mean([k.rstrip("_") for k in unknown], shown)
        raise UsageError(
            f"{where}: unknown parameter(s) {', '.join(k.rstrip('_') for k in unknown)}{guess} (known: "
            f"{', '.join(shown)}{hint})"
        )
    for f in fields(params_type):
        if f.name in values:
            check_type(f"{where}: {f.name.rstrip('_')}", values[f.name], f.type)
    missing = [
        f.name.rstrip("_")
        for f in fields(params_type)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in values
    ]  # type: ignore[misc]
    if missing:
        raise UsageError(f"{where}: needs parameter(s) {', '.join(missing)}")
    try:
        return params_type(**values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: {exc}") from None


def check_range(
    name: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} = {value} is outside {lo}{low}, {high}{hi}")


def check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} = {value} is not finite")


PRECISIONS = ("auto", "float32", "float64")  # the linear-algebra dtype of a method's factorisations


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """The one check of a parameter that takes one of a few values."""
    if value not in choices:
        raise ValueError(f"{name} = {value!r} must be one of {', '.join(repr(c) for c in choices)}")


def auto_precision_on_gpu(params: Any, device_type: str) -> Any:
    """Method.for_device of methods with a `precision` parameter: "auto" is float32 on a GPU."""
    if device_type == "cuda" and params.precision == "auto":
        return dataclasses.replace(params, precision="float32")
    return params


def weighted_sum(task: TensorTask, rows: Rows | None, term: Callable[[int, Rows | None], torch.Tensor]) -> torch.Tensor:
    """Σ w_i term(i, rows), one expert at a time (linear: the experts; task arithmetic: τ_i)."""
    total = None
    for i, w in enumerate(task.weights):
        t_i = term(i, rows)
        if total is None:
            total = torch.zeros_like(t_i)
        total.add_(t_i, alpha=w)
        del t_i
    assert total is not None, "no experts"
    return total
