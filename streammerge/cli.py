"""Command line: `streammerge merge ...` builds a Recipe and calls the API.

Exit codes: 0 done; 1 internal error; 2 usage error (bad flag, recipe or parameter);
3 bad input (missing, malformed or incompatible files, NaN/Inf); 4 resource exhausted (disk
full, unwritable output); 5 output folder holds another merge or other files; 130 interrupted
(SIGINT/SIGTERM) — rerun the same command to resume.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import click

from .errors import StreammergeError
from .methods import method_names
from .recipe import Expert, from_mapping, load_recipe_file
from .units import format_size


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="--param")
    key, value = text.split("=", 1)
    import yaml

    return key.strip().replace("-", "_"), yaml.safe_load(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="streammerge")
def main() -> None:
    """Merge fine-tuned models out of core, one tensor at a time."""


@main.command()
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), help="YAML recipe (ours or mergekit's); flags given beside it override it.")
@click.option("--base", help="Base model folder (model.safetensors or sharded with an index).")
@click.option("--expert", "experts", multiple=True, help="Expert model folder; repeat for each expert.")
@click.option("--weight", "weights", multiple=True, type=float, help="Per-expert weight, in --expert order (default 1 each).")
@click.option("--method", help=f"Merge method: {', '.join(method_names())}.")
@click.option("--out", help="Output folder (created; rerunning the same command resumes into it).")
@click.option("--density", type=float, help="ties: fraction of each task vector kept (default 0.2).")
@click.option("--lambda", "lambda_", type=float, help="Scale of the merged task vector (default 1.0).")
@click.option("--drop-rate", type=float, help="dare: probability of dropping an entry (default 0.5).")
@click.option("--ties-scope", type=click.Choice(["tensor", "model"]), help="ties: take the top-k per tensor or over each expert's whole model (default tensor).")
@click.option("--ties-merge", type=click.Choice(["mean", "sum"]), help="ties/dare_ties: disjoint mean or sum (default mean).")
@click.option("--target", type=click.Choice(["global", "conflict"]), help="orthomerge: Procrustes target, the expert (global) or its conflicting rows (conflict, default).")
@click.option("--residual-method", help="orthomerge: Euclidean method for the residuals (default task_arithmetic with lambda 1/N).")
@click.option("--residual-param", "residual_params", multiple=True, help="orthomerge: a residual-method parameter as KEY=VALUE (repeatable).")
@click.option("--rotation-merge", type=click.Choice(["magnitude_corrected", "average_q", "average_r", "product_r"]), help="orthomerge: how rotations are merged (the paper's ablations).")
@click.option("--exclude", "exclude", multiple=True, help="orthomerge: regex of 2-D tensor names merged without rotation (repeatable), e.g. embed_tokens.")
@click.option("--output-format", type=click.Choice(["dense", "adapter"]), default="dense", show_default=True, help="adapter: orthomerge of PEFT OFT adapters written as one merged PEFT adapter.")
@click.option("--param", "params", multiple=True, help="Any method parameter as KEY=VALUE (repeatable).")
@click.option("--shard-size", help="Largest output shard, e.g. 5GB, 500MiB (default 5GB).")
@click.option("--dtype", help="Output dtype (default: the base model's).")
@click.option("--compute-dtype", help="Dtype the arithmetic is done in (default float32).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Compute device; auto picks CUDA when available.")
@click.option("--seed", type=int, help="Seed for random methods (dare); each tensor draws from (seed, its name).")
@click.option("--allow-nonfinite", is_flag=True, default=None, help="Merge tensors holding NaN/Inf instead of stopping.")
@click.option("--restart", is_flag=True, help="Discard a previous merge in --out made from a different recipe or inputs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines.")
def merge(recipe_path, base, experts, weights, method, out, density, lambda_, drop_rate, ties_scope, ties_merge, target, residual_method, residual_params, rotation_merge, exclude, output_format, params, shard_size, dtype, compute_dtype, device, seed, allow_nonfinite, restart, quiet) -> None:
    """Merge EXPERTs into BASE with METHOD and write a Hugging Face model folder to OUT.

    Re-running the same command after a crash or Ctrl-C resumes where it stopped.
    """
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    if weights and len(weights) != len(experts):
        raise click.UsageError("give one --weight per --expert, or none")
    parameters = dict(_parse_param(p) for p in params)
    for key, value in (
        ("density", density), ("lambda", lambda_), ("drop_rate", drop_rate), ("scope", ties_scope), ("merge", ties_merge),
        ("target", target), ("residual_method", residual_method), ("rotation_merge", rotation_merge),
        ("residual", dict(_parse_param(p) for p in residual_params) or None), ("exclude", list(exclude) or None),
    ):
        if value is not None:
            parameters[key] = value
    overrides: dict[str, Any] = {
        "method": method, "base": base, "out": out, "dtype": dtype, "compute_dtype": compute_dtype,
        "shard_size": shard_size, "seed": seed, "allow_nonfinite": allow_nonfinite,
    }
    if experts:
        overrides["experts"] = tuple(Expert(p, weights[i] if weights else 1.0) for i, p in enumerate(experts))
    try:
        if recipe_path:
            recipe = load_recipe_file(recipe_path, overrides)
            if parameters:
                recipe = type(recipe)(**{**recipe.__dict__, "parameters": {**recipe.parameters, **parameters}})
        else:
            if not method:
                raise click.UsageError("give --method (or --recipe)")
            recipe = from_mapping({"method": method, "parameters": parameters}, "command line", overrides)
        if output_format == "adapter":
            from .adapter_output import merge_to_adapter

            merge_to_adapter(recipe)
            if not quiet:
                click.echo(f"merged adapter written to {recipe.out}", err=True)
            return
        from .scheduler import Merger

        merger = Merger(recipe, device=device, restart=restart, quiet=quiet)
        try:
            report = merger.run()
        finally:
            merger.close()
    except StreammergeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted before the merge started; nothing was written", err=True)
        sys.exit(130)
    if not quiet:
        resumed = f", {report.shards_resumed} resumed" if report.shards_resumed else ""
        click.echo(
            f"merged into {report.out}: {report.shards} shard(s){resumed}, "
            f"{format_size(report.bytes_written)} written in {report.seconds:.1f} s on {report.device}",
            err=True,
        )


@main.command("methods")
def list_methods() -> None:
    """List the merge methods and their parameters with defaults."""
    import dataclasses

    from .methods import REGISTRY, ALIASES, get_method

    for name in method_names():
        m, implied = get_method(name)
        fields = ", ".join(
            f"{f.name.rstrip('_')}={implied.get(f.name, f.default)!r}" for f in dataclasses.fields(m.params_type)
        )
        click.echo(f"{name:18s} {fields}")


if __name__ == "__main__":
    main()
