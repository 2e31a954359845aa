"""Command line: `streammerge merge|plan|verify|report|methods`. `merge` and `plan` take the same
arguments, build a Recipe and call the library.

Exit codes: 0 done; 1 internal error; 2 usage error (bad flag, recipe or parameter);
3 bad input (missing, malformed or incompatible files, NaN/Inf); 4 resource exhausted (disk
full, unwritable output, a budget too small); 5 output folder holds another merge or other
files, or another merge is writing there; 130 interrupted (SIGINT/SIGTERM) — rerun the same
command to resume.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Any

import click

from .allocator import keep_blocks_on_the_heap
from .errors import InputError, Interrupted, StreammergeError, UsageError
from .methods import method_names
from .recipe import Expert, Recipe
from .recipe_files import from_mapping, read_recipe_file
from .units import format_size, parse_size


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="--param")
    key, value = text.split("=", 1)
    import yaml

    return key.strip().replace("-", "_"), yaml.safe_load(value)


_RECIPE_OPTIONS = [
    click.option(
        "--recipe",
        "recipe_path",
        type=click.Path(dir_okay=False),
        help="YAML recipe (ours or mergekit's); flags given beside it override it (--density, --weight: for "
        "every expert).",
    ),
    click.option(
        "--base",
        help="Base model folder (model.safetensors, pytorch_model.bin, or either sharded with an index), or a Hub "
        "repo id ORG/NAME[@REVISION] (the hub extra; checked from headers before any download).",
    ),
    click.option(
        "--expert",
        "experts",
        multiple=True,
        help="Expert: a model folder or a PEFT LoRA/OFT adapter folder, or a Hub repo id of either; repeat for each.",
    ),
    click.option(
        "--weight",
        "weights",
        multiple=True,
        type=float,
        help="Per-expert weight, in --expert order (or the recipe's experts' order); default 1 each.",
    ),
    click.option("--method", help=f"Merge method: {', '.join(method_names())}."),
    click.option("--out", help="Output folder (created; rerunning the same command resumes into it)."),
    click.option(
        "--density",
        type=float,
        help="ties, dare, gta: fraction of each task vector kept, for every expert (ties default 0.2).",
    ),
    click.option("--lambda", "lambda_", type=float, help="Scale of the merged task vector (default 1.0)."),
    click.option("--drop-rate", type=float, help="dare: probability of dropping an entry (default 0.5)."),
    click.option(
        "--ties-scope",
        type=click.Choice(["tensor", "model"]),
        help="ties: top-k per tensor or over each expert's whole model (default tensor).",
    ),
    click.option(
        "--ties-merge", type=click.Choice(["mean", "sum"]), help="ties/dare_ties: disjoint mean or sum (default mean)."
    ),
    click.option(
        "--target",
        type=click.Choice(["global", "conflict"]),
        help="orthomerge: Procrustes target, the expert (global) or its conflicting rows (conflict, default).",
    ),
    click.option(
        "--residual-method",
        help="orthomerge: Euclidean method for the residuals (default task_arithmetic with lambda 1/N).",
    ),
    click.option(
        "--residual-param",
        "residual_params",
        multiple=True,
        help="orthomerge: a residual-method parameter as KEY=VALUE (repeatable).",
    ),
    click.option(
        "--rotation-merge",
        type=click.Choice(["magnitude_corrected", "average_q", "average_r", "product_r"]),
        help="orthomerge: how rotations are merged (the paper's ablations).",
    ),
    click.option(
        "--exclude",
        "exclude",
        multiple=True,
        help="orthomerge: regex of 2-D tensor names merged without rotation (repeatable), e.g. embed_tokens.",
    ),
    click.option("--param", "params", multiple=True, help="Any method parameter as KEY=VALUE (repeatable)."),
    click.option(
        "--shard-size",
        help="Output shard size, e.g. 5GB, 500MiB (default 5GB); a tensor larger than it gets a shard of its own, "
        "larger than this.",
    ),
    click.option("--dtype", help="Output dtype (default: the base model's)."),
    click.option("--compute-dtype", help="Dtype the arithmetic is done in (default float32)."),
    click.option(
        "--seed",
        type=int,
        help="Seed for random methods (dare*, della*, gta's random sparsifier); each tensor draws from (seed, name).",
    ),
    click.option(
        "--allow-nonfinite", is_flag=True, default=None, help="Merge tensors holding NaN/Inf instead of stopping."
    ),
    click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="Compute device; auto picks CUDA when available. Tensors that do not fit --max-gpu-memory run on the CPU.",
    ),
    click.option(
        "--max-ram",
        help="Budget for this process's anonymous memory, e.g. 8GB (default: 90% of the available RAM). Given "
        "explicitly, freed memory is also returned to the OS at once, which is slower on models of many "
        "mid-sized tensors.",
    ),
    click.option("--max-gpu-memory", help="Budget for GPU memory, e.g. 20GB (default: 90% of the GPU's free memory)."),
    click.option(
        "--threads",
        type=click.IntRange(min=1),
        help="CPU threads for the arithmetic (default: the cores free of other load when the merge starts).",
    ),
]


# mergekit-yaml's flags, answered with what to do here instead of click's "no such option"
MERGEKIT_FLAGS = {
    "--cuda": (True, "--cuda is mergekit's flag: here --device cuda (the default, auto, takes a GPU if there is one)"),
    "--lazy-unpickle": (True, "--lazy-unpickle is mergekit's flag: not needed here (inputs are memory-mapped, "
                              "pickled weights never loaded)"),
    "--allow-crimes": (True, "--allow-crimes is mergekit's flag: not needed here (experts of another architecture are "
                             "refused by their config and shapes)"),
    "--copy-tokenizer": (True, "--copy-tokenizer is mergekit's flag: the base's tokenizer files are always copied "
                               "(tokenizer_source in a recipe picks another model's)"),
    "--low-cpu-memory": (True, "--low-cpu-memory is mergekit's flag: memory is planned here (--max-ram)"),
    "--out-shard-size": (False, "--out-shard-size is mergekit's flag: here --shard-size"),
    "--trust-remote-code": (True, "--trust-remote-code is mergekit's flag: no model code is run here"),
}  # fmt: skip


def _mergekit_flag(hint: str):
    def refuse(ctx, param, value):
        if value:
            raise UsageError(hint)

    return refuse


# the LoRA output's options, merge's and plan's (plan checks them as merge does)
_LORA_OPTIONS = [
    click.option("--rank", type=click.IntRange(min=1), help="--output-format lora: the LoRA rank (required there)."),
    click.option(
        "--sv-epsilon",
        type=click.FloatRange(min=0),
        default=0.0,
        show_default=True,
        help="--output-format lora: also drop singular values at or below this (a smaller rank where the update "
        "has one).",
    ),
    click.option(
        "--energy",
        type=click.FloatRange(min=0, max=1, min_open=True),
        default=1.0,
        show_default=True,
        help="--output-format lora: per matrix, the smallest rank (at most --rank) whose singular values hold this "
        "share of the update's energy (sum of squares); 1 keeps --rank.",
    ),
    click.option(
        "--embeddings",
        type=click.Choice(["full", "lora", "skip"]),
        default="full",
        show_default=True,
        help="--output-format lora: embeddings and lm_head saved whole (modules_to_save), decomposed too, or left out.",
    ),
]


def with_options(options: list):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def answered(flags: dict[str, tuple[bool, str]]):
    """Hidden options that, given, stop the command with their line (instead of "no such option")."""
    return with_options([
        click.option(flag, is_flag=is_flag, hidden=True, expose_value=False, callback=_mergekit_flag(hint))
        for flag, (is_flag, hint) in flags.items()
    ])  # fmt: skip


# merge's options that do not change its plan, answered on `plan` with why
MERGE_ONLY = {
    flag: (is_flag, f"{flag} is an option of merge, not of plan (which reads headers, writes nothing and shows a "
                    "local merge's plan): leave it out")
    for flag, is_flag in (("--restart", True), ("--quiet", True), ("-q", True), ("--memory-report", False),
                          ("--checkpoint-every", False), ("--ray", False))
}  # fmt: skip


def positional_recipe(positional: tuple[str, ...], kw: dict) -> None:
    """mergekit's argument order, `merge RECIPE.yaml OUT`, as --recipe RECIPE.yaml --out OUT."""
    if len(positional) > 2:
        raise UsageError(f"at most two arguments, RECIPE and OUT (got {len(positional)}): {' '.join(positional)}")
    for key, flag, value in zip(("recipe_path", "out"), ("--recipe", "--out"), positional):
        if kw.get(key) not in (None, value):
            raise UsageError(f"{value!r} given as an argument and {kw[key]!r} as {flag}: give it once")
        kw[key] = value


def recipe_options(f):
    f = answered(MERGEKIT_FLAGS)(with_options(_RECIPE_OPTIONS)(f))
    return click.argument("positional", nargs=-1, metavar="[RECIPE [OUT]]")(f)


def build_recipe(
    recipe_path,
    base,
    experts,
    weights,
    method,
    out,
    density,
    lambda_,
    drop_rate,
    ties_scope,
    ties_merge,
    target,
    residual_method,
    residual_params,
    rotation_merge,
    exclude,
    params,
    shard_size,
    dtype,
    compute_dtype,
    seed,
    allow_nonfinite,
    default_out: str | None = None,
    **_: Any,
) -> tuple[Recipe, dict[str, Any]]:
    """The recipe the command line describes, and the run settings its recipe file gives."""
    if weights and len(weights) != len(experts) and not (recipe_path and not experts):
        raise UsageError(
            f"give one --weight per --expert, or none ({len(weights)} --weight for {len(experts)} --expert)"
        )
    parameters = dict(_parse_param(p) for p in params)
    for key, value in (
        ("density", density),
        ("lambda", lambda_),
        ("drop_rate", drop_rate),
        ("scope", ties_scope),
        ("merge", ties_merge),
        ("target", target),
        ("residual_method", residual_method),
        ("rotation_merge", rotation_merge),
        ("residual", dict(_parse_param(p) for p in residual_params) or None),
        ("exclude", list(exclude) or None),
    ):
        if value is not None:
            parameters[key] = value
    overrides: dict[str, Any] = {
        "method": method,
        "base": base,
        "out": out,
        "dtype": dtype,
        "compute_dtype": compute_dtype,
        "shard_size": shard_size,
        "seed": seed,
        "allow_nonfinite": allow_nonfinite,
    }
    if experts:
        overrides["experts"] = tuple(Expert(p, weights[i] if weights else None) for i, p in enumerate(experts))
    if recipe_path:
        recipe, run = read_recipe_file(recipe_path, overrides, default_out)
        return override_values(recipe, parameters, weights if not experts else ()), run
    if not method:
        raise click.UsageError("give --method (or --recipe)")
    return from_mapping({"method": method, "parameters": parameters}, "command line", overrides, default_out), {}


def override_values(recipe: Recipe, parameters: dict[str, Any], weights: tuple[float, ...]) -> Recipe:
    """Flags beside --recipe win over every value the recipe holds: a parameter flag replaces the
    recipe's parameter and, for a per-expert value (weight, density, …), each expert's own; --weight
    gives the recipe's experts their weights in order."""
    import dataclasses

    from .methods import get_method

    experts = recipe.experts
    if weights:
        if len(weights) != len(experts):
            raise UsageError(
                f"give one --weight per expert of the recipe ({len(weights)} --weight, {len(experts)} experts)"
            )
        experts = tuple(dataclasses.replace(e, weight=w) for e, w in zip(experts, weights))
    per_expert = set(get_method(recipe.method)[0].expert_params)
    for key in set(parameters) & per_expert:
        experts = tuple(
            dataclasses.replace(e, **{key: None}) if key in ("weight", "density")
            else dataclasses.replace(e, parameters={k: v for k, v in e.parameters.items() if k != key})
            for e in experts
        )  # fmt: skip
    return dataclasses.replace(recipe, experts=experts, parameters={**recipe.parameters, **parameters})


def _budgets(kw: dict) -> dict[str, int | None]:
    return {
        "max_ram": parse_size(kw["max_ram"]) if kw.get("max_ram") else None,
        "max_gpu_memory": parse_size(kw["max_gpu_memory"]) if kw.get("max_gpu_memory") else None,
        "threads": kw.get("threads"),
    }


def exit_with(exc: StreammergeError) -> None:
    """A project error as one line on stderr and its exit code."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def reports_errors(f):
    """Turn project errors into one line on stderr and their exit code."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except StreammergeError as exc:
            exit_with(exc)
        except KeyboardInterrupt:
            click.echo("error: interrupted before the merge started; nothing was written", err=True)
            sys.exit(130)

    return wrapper


class StrictCommand(click.Command):
    """A command whose options' values are never its own option names: click would take
    `--memory-report --out DIR` as a report file named "--out" and DIR as the recipe."""

    def parse_args(self, ctx, args):
        options = [p for p in self.get_params(ctx) if isinstance(p, click.Option)]
        names = {name for p in options for name in p.opts + p.secondary_opts}
        takes_value = {name for p in options if not p.is_flag and not p.count for name in p.opts}
        for flag, value in zip(args, args[1:]):
            if flag == "--":
                break
            if flag in takes_value and value.split("=", 1)[0] in names:
                raise UsageError(f"{flag} takes a value, and {value} after it is an option: give {flag} its value")
        return super().parse_args(ctx, args)


class Commands(click.Group):
    """The command group; a project error raised while a command's arguments are read (a
    mergekit flag's hint, an option without its value) ends as one line and its exit code, as
    errors inside commands do."""

    command_class = StrictCommand

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except StreammergeError as exc:
            exit_with(exc)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="streammerge")
def main() -> None:
    """Merge fine-tuned models out of core, one tensor at a time."""
    keep_blocks_on_the_heap()


@main.command()
@recipe_options
@click.option(
    "--output-format",
    type=click.Choice(["dense", "adapter", "lora", "gguf"]),
    default="dense",
    show_default=True,
    help="adapter: orthomerge of PEFT OFT adapters written as one merged PEFT adapter; lora: the merge's update "
    "W - W0 of every linear weight as a PEFT LoRA adapter of rank --rank (truncated SVD, mergekit-extract-lora's "
    "meaning); gguf: one GGUF file for llama.cpp (--out NAME.gguf; Llama, Mistral, Qwen2; BPE or SentencePiece "
    "tokenizers).",
)
@click.option(
    "--gguf-type",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
    help="--output-format gguf: the type of the 2-D weights (default: the input's float type; 1-D tensors f32).",
)
@with_options(_LORA_OPTIONS)
@click.option(
    "--restart", is_flag=True, help="Discard a previous merge in --out made from a different recipe or inputs."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines.")
@click.option(
    "--memory-report",
    type=click.Path(dir_okay=False),
    help="Write planned and measured peak memory, bytes read ahead and written, the read-ahead's rate "
    "(null where the system reads ahead itself) and the seconds spent compiling kernels to this JSON file.",
)
@click.option(
    "--checkpoint-every",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds between making progress inside a shard durable, so a resume continues mid-shard.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="Record per-tensor diagnostics (norms, cosines, the method's own) to this JSON file; costs one more read of "
    "the inputs. Summarise with `streammerge report`.",
)
@click.option(
    "--ray",
    "ray_address",
    metavar="local|auto|ADDRESS",
    help="Merge the output shards as tasks on a Ray cluster (needs the `ray` extra): local starts a private one on "
    "this machine, auto or HOST:PORT joins a running one. Inputs and --out must be paths every node can read and "
    "write. Each task uses --threads CPUs (default 1). Same output as a local merge.",
)
@reports_errors
def merge(output_format, gguf_type, rank, sv_epsilon, energy, embeddings, restart, quiet, memory_report,
          checkpoint_every, report_path, ray_address, positional, **kw):  # fmt: skip
    """Merge EXPERTs into BASE with METHOD and write a Hugging Face model folder to OUT
    (or `merge RECIPE.yaml OUT`, mergekit's order).

    Re-running the same command after a crash or Ctrl-C resumes where it stopped.
    """
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    positional_recipe(positional, kw)
    recipe, run = build_recipe(**kw)
    from .engine.options import check_output_file

    check_output_file(memory_report, "--memory-report")
    ray = ray_address or run.get("ray")
    lora = output_options(output_format, rank, sv_epsilon, energy, embeddings, report_path)
    if gguf_type is not None and output_format != "gguf":
        raise UsageError("--gguf-type goes with --output-format gguf")
    if ray is not None:
        if output_format != "dense":
            raise UsageError(f"--ray merges dense shards; an {output_format} output is written in one process")
        from .engine.ray import import_ray

        import_ray()  # a clear error before anything is written
    import torch

    if output_format == "adapter":
        from .adapter_output import merge_to_adapter
        from .cpu import choose_threads
        from .engine.remote import RemoteInputs

        torch.set_num_threads(choose_threads(kw.get("threads")))
        remote = RemoteInputs(recipe, quiet)  # Hub adapters: small files, downloaded whole
        try:
            with remote.named():
                merge_to_adapter(remote.fetch(quiet))
        finally:
            remote.close()
        if not quiet:
            click.echo(f"merged adapter written to {recipe.out}", err=True)
        return
    from .engine import Merge, RunOptions

    options = RunOptions(
        device=kw["device"],
        restart=restart,
        quiet=quiet,
        checkpoint_seconds=checkpoint_every,
        report=report_path,
        ray=ray,
        **_budgets(kw),
    )
    merger = Merge(recipe, options)
    try:
        if output_format in ("lora", "gguf"):
            from .engine.run import sigterm_as_interrupt

            try:
                with sigterm_as_interrupt():
                    if lora is not None:
                        merge_lora(merger, lora, restart, quiet)
                    else:
                        merge_gguf(merger, gguf_type, restart, checkpoint_every, quiet)
            except KeyboardInterrupt:
                raise Interrupted("interrupted; what is finished is kept — rerun the same command to resume") from None
            return
        report = merger.run()
    finally:
        merger.close()
    if memory_report:
        gpu = {}
        if report.device.startswith("cuda"):  # what torch's allocator held at most, against the plan
            gpu = {"planned_peak_gpu": merger.plan.peak_gpu, "measured_peak_gpu": torch.cuda.max_memory_allocated()}
        with open(memory_report, "w") as f:
            json.dump(
                gpu
                | {
                    "planned_peak_ram": report.planned_peak_ram,
                    "measured_peak_ram": report.measured_peak_ram,
                    "baseline_ram": merger.plan.baseline,
                    "ram_budget": merger.plan.ram_budget,
                    "seconds": report.seconds,
                    "bytes_read_ahead": report.bytes_read_ahead,
                    "read_throughput": report.read_throughput,
                    "bytes_written": report.bytes_written,
                    "compile_seconds": report.compile_seconds,
                },
                f,
                indent=2,
            )
    if not quiet:
        resumed = f", {report.shards_resumed} resumed" if report.shards_resumed else ""
        compiling = f" ({report.compile_seconds:.1f} s of it compiling kernels, once)" if report.compile_seconds else ""
        click.echo(
            f"merged into {report.out}: {report.shards} shard(s){resumed}, "
            f"{format_size(report.bytes_written)} written in {report.seconds:.1f} s{compiling} on {report.device} "
            f"({report.threads} thread(s)); "
            f"peak RAM {format_size(report.measured_peak_ram)} (planned {format_size(report.planned_peak_ram)})",
            err=True,
        )


def output_options(output_format: str, rank: int | None, sv_epsilon: float, energy: float, embeddings: str,
                   report_path: str | None):  # fmt: skip
    """The LoRA output's options, or None; options refused before any work where they do not fit the format."""
    if report_path is not None and output_format == "adapter":
        raise UsageError("--report records a merge's per-tensor diagnostics; --output-format adapter merges OFT "
                         "generators into an adapter and records none: leave it out")  # fmt: skip
    if output_format != "lora":
        if rank is not None:
            raise UsageError("--rank goes with --output-format lora")
        return None
    if rank is None:
        raise UsageError("--output-format lora needs --rank R (the LoRA rank)")
    from .lora_output import LoraOptions

    return LoraOptions(rank, sv_epsilon, embeddings, energy)


def merge_lora(merger, lora, restart: bool, quiet: bool) -> None:
    from .io.lock import OutputLock
    from .lora_output import check_and_fetch, merge_to_lora, summary

    check_and_fetch(merger)  # before --out is made
    os.makedirs(merger.inputs.recipe.out, exist_ok=True)
    with OutputLock(merger.inputs.recipe.out):
        out, report = merge_to_lora(merger, lora, restart)
    if not quiet:
        click.echo(f"LoRA adapter (rank {lora.rank}) written to {out}: {summary(report)}", err=True)


def merge_gguf(merger, gguf_type: str | None, restart: bool, checkpoint_every: float, quiet: bool) -> None:
    from .gguf_output import merge_to_gguf

    path = merge_to_gguf(merger, gguf_type, restart, checkpoint_every, quiet)
    if not quiet:
        click.echo(f"merged into {path} ({format_size(os.path.getsize(path))})", err=True)


@main.command()
@recipe_options
@click.option(
    "--output-format",
    type=click.Choice(["dense", "adapter", "lora", "gguf"]),
    default="dense",
    show_default=True,
    help="Plan a dense merge, an OFT adapter merge, a LoRA output (the dense plan and one SVD) or a GGUF file "
    "(the dense plan; checks the architecture and tokenizer).",
)
@click.option("--gguf-type", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), help="As for merge.")
@click.option("--per-tensor", is_flag=True, help="One line per tensor instead of per tensor kind.")
@click.option(
    "--assume-gpu",
    help="Plan as if a CUDA device with this much memory were present, e.g. 24GB (no GPU needed to plan).",
)
@click.option(
    "--measure",
    is_flag=True,
    help="Read the tensors whose working set depends on the data (OrthoMerge-C: wide weights, to count their "
    "conflicting rows) and plan with what they need instead of upper bounds.",
)
@click.option(
    "--estimate/--no-estimate",
    default=True,
    show_default=True,
    help="Estimate the merge's time on this machine (about a second of calibration and a 128 MB read).",
)
@with_options(_LORA_OPTIONS)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="As for merge: its pass over each merged tensor is planned (nothing is written).",
)
@answered(MERGE_ONLY)
@reports_errors
def plan(output_format, gguf_type, per_tensor, assume_gpu, measure, estimate, rank, sv_epsilon, energy, embeddings,
         report_path, positional, **kw) -> None:  # fmt: skip
    """Print the memory plan of a merge (merge's arguments but --restart, --quiet, --memory-report,
    --checkpoint-every and --ray; --out is optional: without it the disk check uses the current
    folder) without merging or writing anything.

    Exits 4 when the merge would not fit the RAM budget or the disk.
    """
    from .engine import Merge, RunOptions
    from .engine.remote import RemoteInputs

    positional_recipe(positional, kw)
    default_out = os.path.join(os.getcwd(), "merged.gguf" if output_format == "gguf" else "merged")
    recipe, _ = build_recipe(**kw, default_out=default_out)  # plan writes nothing
    output_options(output_format, rank, sv_epsilon, energy, embeddings, report_path)  # refused as merge does
    if output_format == "adapter":
        from .adapter_output import adapter_plan

        remote = RemoteInputs(recipe)
        try:
            with remote.named():
                click.echo(adapter_plan(remote.planning))
        finally:
            remote.close()
        return
    options = RunOptions(
        device=kw["device"],
        quiet=True,
        assume_gpu=parse_size(assume_gpu) if assume_gpu else None,
        report=report_path,  # its pass over each result is planned; nothing is written
        **_budgets(kw),
    )
    merger = Merge(recipe, options)
    try:
        if measure and merger.measures_plan():
            merger.plan_with(merger.measure_statistics())
        click.echo(merger.plan.table(groups=not per_tensor))
        if estimate and not assume_gpu:  # calibrated on this machine's devices: not for a GPU planned elsewhere
            click.echo(merger.estimate().line())
        if output_format == "lora":
            from .lora_output import plan_line

            click.echo(plan_line(merger))
        if output_format == "gguf":
            from .gguf_output import GgufLayout

            layout = GgufLayout(merger.inputs, recipe.out, gguf_type)
            what = f"GGUF ({layout.arch}, {layout.gguf_type}, tokenizer {layout.vocab.model}/{layout.vocab.pre})"
            click.echo(f"{what}: {len(layout.tensors)} tensors, {format_size(layout.size)} written to {recipe.out}")
        downloads = merger.remote.download_line()
        if downloads:
            click.echo(downloads)
        merger.plan.check()
        merger.remote.check_disk(recipe.out, sum(s.nbytes for s in merger.shards))
    finally:
        merger.close()


@main.command()
@click.argument("out")
@reports_errors
def verify(out) -> None:
    """Check a finished merge in OUT: index, shard files, headers, every base tensor, checksums."""
    from .verify import verify_output

    click.echo(verify_output(out))


@main.command("report")
@click.argument("report_file", type=click.Path(dir_okay=False))
@click.option(
    "--plots",
    type=click.Path(file_okay=False),
    help="Also write per-layer PNG plots to this folder (needs matplotlib: the `report` extra).",
)
@reports_errors
def report_cmd(report_file, plots) -> None:
    """Summarise a --report file: per tensor kind, cosines between experts, update size and the
    method's own diagnostics (OrthoMerge's rotation share, ‖Q*‖, conflicts; kept ranks)."""
    from .io.checkpoint import load_json
    from .report import plot, pyplot, summary

    if plots:
        pyplot()  # refused before anything is printed where matplotlib is missing
    if not os.path.isfile(report_file):
        raise InputError(f"{report_file}: no such file")
    doc = load_json(report_file)
    if not isinstance(doc, dict) or "tensors" not in doc:
        raise InputError(f"{report_file}: not a streammerge report (no 'tensors')")
    click.echo(summary(doc))
    if plots:
        for path in plot(doc, plots):
            click.echo(f"wrote {path}")


@main.command("methods")
def list_methods() -> None:
    """List the merge methods, their parameters with defaults, and each expert's values."""
    import dataclasses

    from .methods import REQUIRED, get_method
    from .quality_marks import MARKS, SOURCE

    def shown(v):
        return "required" if v is REQUIRED or v is dataclasses.MISSING else repr(v)

    for name in method_names():
        m, implied = get_method(name)
        fields = []
        for f in dataclasses.fields(m.params_type):
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            )  # type: ignore[misc]
            fields.append(f"{f.name.rstrip('_')}={shown(implied.get(f.name, default))}")
        per_expert = ", ".join(f"{k}={shown(v)}" for k, v in m.expert_params.items()) or "none"
        paragraph = " ".join(m.doc.strip().split("\n\n")[0].split())
        summary = paragraph if len(paragraph) <= 110 else paragraph[: paragraph.rfind(" ", 0, 108)] + " …"
        click.echo(
            f"{name:17s} {summary}\n{'':17s} parameters: {', '.join(fields) or 'none'}; per expert: {per_expert}"
        )
        for line in MARKS.get(name, []):
            click.echo(f"{'':17s} measured: {line}")
    click.echo(
        "\nA mergekit recipe (one with merge_method) keeps mergekit 0.1.5's meaning: task_arithmetic, ties,\n"
        "dare_ties, dare_linear, breadcrumbs*, della* run as gta with mergekit's defaults (weight required,\n"
        "density 1). The same names given with --method or in our recipes are ours: ties trims to density 0.2\n"
        "by default, keeps every entry tied at the threshold, averages agreeing experts by count and elects the\n"
        "tensor's majority sign where the sum is 0; dare drops with drop_rate 0.5 and rescales by 1/(1-p);\n"
        "weights default to 1; we compute in float32."
    )
    click.echo(
        f"\n'measured': against task arithmetic (TA) on SmolLM2-135M-Instruct adapters, five tasks ({SOURCE});\n"
        "one small model, each row's parameters chosen on validation: evidence, not a guarantee for an 8B."
    )


def entry() -> None:
    """The `streammerge` command: main(), leaving with exactly the exit status it chose."""
    try:
        main()
    except SystemExit as exc:
        if exc.code != Interrupted.exit_code:
            raise
        # Why not a plain exit: CPython 3.11 ends its process by SIGINT (status -2, not 130) when
        # the interrupt was raised inside code run through PyRun_* (its "unhandled
        # KeyboardInterrupt" flag stays set though we handled it; seen once in CI on SIGTERM).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.code)


if __name__ == "__main__":
    entry()
