"""The same merge on a Ray cluster: one Ray task per unfinished output shard.

The output shard stays the unit of work and of resume. The driver (the `streammerge merge`
process) validates the inputs, plans shards and memory, journals, and runs any whole-model
statistics pass exactly as a local merge does; then it submits one task per unfinished shard,
asking Ray for the CPUs, GPU and memory that shard's plan needs. A task opens the inputs from the
path the driver was given (storage every node can read), merges its tensors with the local
merge's own code (`Merger.write_shard`) on the devices the driver's plan chose, writes the shard
under a temporary name of its own, renames it to the final name and returns its sha256 and size.
The driver journals each result as it arrives and writes the index last, so:

- the output is byte-identical to a local merge of the same recipe on the same kind of device;
- a worker killed mid-shard leaves only its temporary file; Ray retries the task (at most
  `TASK_RETRIES` times) and the retry writes the shard from its start;
- a driver killed at any point is resumed by rerunning the same command: journalled shards are
  kept, the rest are merged again.

Ray is optional (`pip install 'streammerge[ray]'`).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import ResourceError, StreammergeError, UsageError
from .io.atomic import TMP_SUFFIX, temp_name
from .io.journal import Journal
from .units import format_size

log = logging.getLogger(__name__)

TASK_RETRIES = 3  # attempts after a worker or node dies mid-shard, before the merge stops (resumable)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'streammerge[ray]'") from None
    return ray


@contextmanager
def worker_merger(recipe, device: str, budgets: dict, placement: dict[str, str], threads: int) -> Iterator:
    """In a Ray task: the merge as the driver set it up (its budgets, its devices per tensor)."""
    import torch

    from .scheduler import Merger

    torch.set_num_threads(threads)
    merger = Merger(recipe, device=device, quiet=True, **budgets)
    try:
        merger.reuse_placement(placement)
        yield merger
    finally:
        merger.close()


def merge_shard_task(
    recipe, device: str, budgets: dict, shard_name: str, placement: dict[str, str], statistics, threads: int
) -> tuple[str, str, int]:
    """One Ray task: merge and write one shard; (shard name, sha256, size)."""
    from .prefetch import ReadAhead

    with worker_merger(recipe, device, budgets, placement, threads) as merger:
        shard = next(s for s in merger.shards if s.filename == shard_name)
        read_ahead = ReadAhead(merger.input_ranges([shard])).start()  # as the local loop: the shard's inputs read ahead
        try:
            # a name no other attempt uses: a retry may start while an orphaned attempt still writes
            sha, size = merger.write_shard(
                shard, statistics, read_ahead=read_ahead, temp_tag=f"ray-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            )
        finally:
            read_ahead.stop()
        return shard_name, sha, size


def statistics_task(
    recipe, device: str, budgets: dict, shard_name: str, placement: dict[str, str], threads: int, fn, args: tuple
):
    """One Ray task of a statistics pass: `fn` over the tensors of one shard (methods.MapPass)."""
    with worker_merger(recipe, device, budgets, placement, threads) as merger:
        shard = next(s for s in merger.shards if s.filename == shard_name)
        return fn(merger.model_blocks({t.name for t in shard.tensors}, progress=False), *args)


class RayExecutor:
    """Runs the unfinished shards of one merge as Ray tasks; the driver side."""

    def __init__(self, merger, address: str, threads: int):
        self.merger, self.address, self.threads = merger, address, threads
        self.ray = import_ray()

    # -- the cluster -----------------------------------------------------------------------
    def start(self) -> None:
        ray = self.ray
        kwargs = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
            "configure_logging": False,
        }
        try:
            if self.address == "local":
                ray.init(
                    address="local", **kwargs
                )  # a private instance on this machine (never a running one), shut down after the merge
            else:
                ray.init(address=self.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            hint = (
                ""
                if self.address == "local" or os.environ.get("RAY_AUTH_MODE")
                else ("; a cluster started with `ray start` expects its token: set RAY_AUTH_MODE=token")
            )
            raise ResourceError(
                f"--ray {self.address}: cannot start or join a Ray cluster ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}){hint}"
            ) from None

    def stop(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()

    def needs(self, shard) -> dict:
        """Ray resources of one shard's task, from the plan: its largest tensor's host and GPU peaks."""
        placed = [self.merger.placement_of(t.name) for t in shard.tensors]
        need = {"num_cpus": self.threads, "memory": self.merger.plan.peak_host_of(placed)}
        if any(p.device == "cuda" for p in placed):
            need["num_gpus"] = 1
        return need

    def check_resources(self, shards) -> None:
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
                    f"{need['num_cpus']} CPU(s){' and a GPU' if 'num_gpus' in need else ''} on one node; the largest node offers "
                    f"{format_size(largest)}, {cpus:g} CPU(s), {gpus:g} GPU(s)"
                )

    def _shard_placement(self, shard) -> dict[str, str]:
        placement = self.merger.placement_devices()
        return {t.name: placement[t.name] for t in shard.tensors if t.name in placement}

    def _get(self, ref, shard):
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

    def map_pass(self, fn, *args) -> list:
        """The Ray MapPass (methods/__init__.py): `fn` over each shard's tensors, one task per shard
        that has merged tensors, results in shard order."""
        merger = self.merger
        task = self.ray.remote(statistics_task)
        recipe_ref = self.ray.put(merger.recipe)
        shards = [s for s in merger.shards if any(t.merged for t in s.tensors)]
        refs = [
            task.options(max_retries=TASK_RETRIES, name=f"statistics {s.filename}", **self.needs(s)).remote(
                recipe_ref,
                merger.device.type,
                merger.budgets,
                s.filename,
                self._shard_placement(s),
                self.threads,
                fn,
                args,
            )
            for s in shards
        ]
        results: list = []
        try:
            for ref, s in zip(refs, shards):
                results.append(self._get(ref, s))
        finally:
            for ref in refs[len(results) :]:  # an error or Ctrl-C: stop the tasks still running
                self.ray.cancel(ref, force=True)
        return results

    # -- the shards ------------------------------------------------------------------------
    def merge(self, todo, journal: Journal, progress, check_inputs) -> int:
        """Submit every shard in `todo`, journal each as it finishes (after `check_inputs()`:
        inputs unchanged); bytes written."""
        ray = self.ray
        merger = self.merger
        if journal.partial:  # a local run's half-written shard: a task writes its shard from the start
            try:
                os.remove(temp_name(os.path.join(merger.recipe.out, journal.partial["shard"])))
            except OSError:
                pass
            journal.partial = None
            journal.save()
        task = ray.remote(merge_shard_task)
        recipe_ref = ray.put(merger.recipe)
        statistics_ref = ray.put(merger.merge_statistics(journal))
        pending = {}
        for shard in todo:
            ref = task.options(max_retries=TASK_RETRIES, name=f"merge {shard.filename}", **self.needs(shard)).remote(
                recipe_ref,
                merger.device.type,
                merger.budgets,
                shard.filename,
                self._shard_placement(shard),
                statistics_ref,
                self.threads,
            )
            pending[ref] = shard
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
                progress.done(shard.nbytes, sum(merger.placement_of(t.name).read_bytes for t in shard.tensors))
        finally:
            for ref in pending:  # an error or Ctrl-C: stop the shards still running
                ray.cancel(ref, force=True)
        # what attempts killed mid-shard left (their retries wrote the shards)
        for f in os.listdir(merger.recipe.out):
            if f.endswith(TMP_SUFFIX) and ".ray-" in f:
                try:
                    os.remove(os.path.join(merger.recipe.out, f))
                except OSError:
                    pass
        return written
