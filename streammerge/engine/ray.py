"""The same shard loop on a Ray cluster: one Ray task per unfinished output shard.

The output shard stays the unit of work and of resume. The driver (the `streammerge merge`
process) validates, plans, journals and runs any whole-model statistics pass exactly as a local
merge does; then it submits one task per unfinished shard, asking Ray for the CPUs, GPU and
memory that shard's plan needs. A task receives what the driver decided for its shard (each
tensor's values and device: a `TensorJob`), opens the inputs from the paths the driver was given
(storage every node can read) without checking or planning them again, merges its tensors with
the local loop's own code (shards.write_shard), writes the shard under a temporary name of its
own, renames it to the final name and returns its sha256 and size. The driver journals each
result as it arrives and writes the index last, so:

- the output is byte-identical to a local merge of the same recipe on the same kind of device;
- a worker killed mid-shard leaves only its temporary file; Ray retries the task (at most
  `TASK_RETRIES` times) and the retry writes the shard from its start;
- a driver killed at any point is resumed by rerunning the same command: journalled shards are
  kept, the rest are merged again.

Ray is optional (`pip install -e '.[ray]'` in the clone).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import ResourceError, StreammergeError, UsageError
from ..io.atomic import TMP_SUFFIX, temp_name
from ..io.journal import Journal
from ..plan import Plan
from ..recipe import Recipe
from ..units import format_size
from .inputs import Shard, open_sources
from .options import RunOptions
from .shards import Progress, start_read_ahead, stop_read_ahead, write_shard
from .statistics import model_blocks
from .tensors import TensorComputer, TensorJob

log = logging.getLogger(__name__)

TASK_RETRIES = 3  # attempts after a worker or node dies mid-shard, before the merge stops (resumable)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install -e '.[ray]' in the clone") from None
    return ray


@contextmanager
def task_computer(recipe: Recipe, options: RunOptions, job: TensorJob) -> Iterator[TensorComputer]:
    """In a Ray task: the inputs opened (not checked again) and the driver's job for one shard."""
    import torch

    from ..allocator import return_freed_memory_to_os

    torch.set_num_threads(options.task_threads)
    if options.max_ram is not None:
        return_freed_memory_to_os()  # as the driver: an explicit budget keeps allocator slack out
    base, experts, _, _ = open_sources(recipe)
    try:
        yield TensorComputer(job, base, experts)
    finally:
        for ck in (base, *experts):
            ck.close()


def merge_shard_task(
    recipe: Recipe, options: RunOptions, job: TensorJob, shard: Shard, statistics
) -> tuple[str, str, int]:
    """One Ray task: merge and write one shard; (shard name, sha256, size)."""
    with task_computer(recipe, options, job) as computer:
        read_ahead = start_read_ahead(computer, [shard])  # as the local loop: the shard's inputs read ahead
        try:
            # a name no other attempt uses: a retry may start while an orphaned attempt still writes
            tag = f"ray-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            sha, size = write_shard(computer, shard, statistics, recipe.out, read_ahead=read_ahead, temp_tag=tag)
        finally:
            stop_read_ahead(computer, read_ahead)
        return shard.filename, sha, size


def statistics_task(recipe: Recipe, options: RunOptions, job: TensorJob, shard: Shard, fn, args: tuple):
    """One Ray task of a statistics pass: `fn` over the tensors of one shard (statistics.py)."""
    with task_computer(recipe, options, job) as computer:
        return fn(model_blocks(computer, shard.tensors, progress=False), *args)


class RayExecutor:
    """Runs the unfinished shards of one merge as Ray tasks; the driver side."""

    label = ", Ray"
    continues_partial_shard = False  # a task writes its shard from the start

    def __init__(self, recipe: Recipe, options: RunOptions, job: TensorJob, shards: list[Shard], plan: Plan):
        self.recipe, self.options, self.job, self.shards, self.plan = recipe, options, job, shards, plan
        self.address = options.ray
        self.ray = import_ray()

    def start(self) -> None:
        ray = self.ray
        kwargs = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
            "configure_logging": False,
        }
        try:
            # "local": a private instance on this machine (never a running one), shut down after the merge
            ray.init(address=self.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            hint = "" if self.address == "local" or os.environ.get("RAY_AUTH_MODE") else (
                "; a cluster started with `ray start` expects its token: set RAY_AUTH_MODE=token"
            )  # fmt: skip
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ResourceError(f"--ray {self.address}: cannot start or join a Ray cluster ({first}){hint}") from None

    def stop(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()

    def needs(self, shard: Shard) -> dict:
        """Ray resources of one shard's task, from the plan: its largest tensor's host and GPU peaks."""
        placed = [self.job.placement[t.name] for t in shard.tensors]
        need = {"num_cpus": self.options.task_threads, "memory": self.plan.peak_host_of(placed)}
        if any(p.device == "cuda" for p in placed):
            need["num_gpus"] = 1
        return need

    def check_resources(self, shards: list[Shard]) -> None:
        """Refuse up front a shard that no node of the cluster can run, as a local plan refuses."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        for shard in shards:
            need = self.needs(shard)
            wanted = {"CPU": need["num_cpus"], "memory": need["memory"], "GPU": need.get("num_gpus", 0)}
            if not any(all(node.get(k, 0) >= v for k, v in wanted.items() if v) for node in nodes):
                largest = max((node.get("memory", 0) for node in nodes), default=0)
                cpus = max((node.get("CPU", 0) for node in nodes), default=0)
                gpus = max((node.get("GPU", 0) for node in nodes), default=0)
                raise ResourceError(
                    f"--ray {self.address}: shard {shard.filename} needs {format_size(need['memory'])} of memory, "
                    f"{need['num_cpus']} CPU(s){' and a GPU' if 'num_gpus' in need else ''} on one node; the largest "
                    "node offers "
                    f"{format_size(largest)}, {cpus:g} CPU(s), {gpus:g} GPU(s)"
                )

    def _get(self, ref, shard: Shard):
        """A task's result; its error as the project's error for that shard."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, StreammergeError):
                raise cause from None
            what = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc).strip().splitlines()[0]
            raise ResourceError(f"{shard.filename}: the Ray task failed: {what}") from None
        except ray.exceptions.RayError as exc:  # its worker or node died on every attempt
            raise ResourceError(
                f"{shard.filename}: its Ray worker died {TASK_RETRIES + 1} times ({type(exc).__name__}); "
                "the finished shards are kept — rerun the same command to resume"
            ) from None

    def _submit(self, fn, shards: list[Shard], what: str, *args) -> list:
        task = self.ray.remote(fn)
        recipe_ref, options_ref = self.ray.put(self.recipe), self.ray.put(self.options)
        return [
            task.options(max_retries=TASK_RETRIES, name=f"{what} {s.filename}", **self.needs(s)).remote(
                recipe_ref, options_ref, self.job.for_tensors(t.name for t in s.tensors), s, *args
            )
            for s in shards
        ]

    def map_pass(self, fn, *args) -> list:
        """`fn` over each shard's tensors, one task per shard that has merged tensors, in shard order."""
        shards = [s for s in self.shards if any(t.merged for t in s.tensors)]
        refs = self._submit(statistics_task, shards, "statistics", fn, args)
        results: list = []
        try:
            for ref, s in zip(refs, shards):
                results.append(self._get(ref, s))
        finally:
            for ref in refs[len(results) :]:  # an error or Ctrl-C: stop the tasks still running
                self.ray.cancel(ref, force=True)
        return results

    def merge(self, todo: list[Shard], journal: Journal, progress: Progress, check_inputs, statistics) -> int:
        """Submit every shard in `todo`, journal each as it finishes (after `check_inputs()`:
        inputs unchanged); bytes written."""
        ray, out = self.ray, self.recipe.out
        if journal.partial:  # a local run's half-written shard: a task writes its shard from the start
            try:
                os.remove(temp_name(os.path.join(out, journal.partial["shard"])))
            except OSError:
                pass
            journal.partial = None
            journal.save()
        pending = dict(zip(self._submit(merge_shard_task, todo, "merge", ray.put(statistics)), todo))
        written = 0
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                shard = pending.pop(done[0])
                name, sha, size = self._get(done[0], shard)
                check_inputs()
                journal.finished[name] = {"sha256": sha, "size": size}
                journal.save()
                written += size
                progress.done(shard.nbytes, sum(self.job.placement[t.name].read_bytes for t in shard.tensors))
        finally:
            for ref in pending:  # an error or Ctrl-C: stop the shards still running
                ray.cancel(ref, force=True)
        for f in os.listdir(out):  # what attempts killed mid-shard left (their retries wrote the shards)
            if f.endswith(TMP_SUFFIX) and ".ray-" in f:
                try:
                    os.remove(os.path.join(out, f))
                except OSError:
                    pass
        return written

    def stats(self) -> tuple[int, float | None, float]:
        return 0, None, 0.0  # the tasks read and compile on their own nodes
