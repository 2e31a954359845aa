"""Inputs named by Hub repo ids: resolved first, checked and planned from their headers alone, and
downloaded only when the merge runs, after every check has passed (io/hub.py).

    remote = RemoteInputs(recipe)          # commits resolved; config, index and headers read
    inputs = open_merge(remote.planning)   # every check and the plan, no weight downloaded
    recipe = remote.fetch()                # the weights into the cache: the recipe of its folders
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import InputError, ResourceError, StreammergeError, collect
from ..io import hub
from ..plan import existing_folder, free_disk
from ..recipe import Recipe
from ..units import format_size


def references(recipe: Recipe) -> list[str]:
    """The recipe's model references that are repo ids, each once, in order."""
    refs = [recipe.base, *(e.path for e in recipe.experts), *(s["model"] for s in recipe.slices or ())]
    if recipe.tokenizer_source not in (None, "base", "union"):
        refs.append(recipe.tokenizer_source)
    return list(dict.fromkeys(r for r in refs if hub.is_repo_id(r)))


def with_paths(recipe: Recipe, paths: dict[str, str], origins: tuple) -> Recipe:
    def swap(ref):
        return paths.get(ref, ref)

    slices = None if recipe.slices is None else tuple(s | {"model": swap(s["model"])} for s in recipe.slices)
    experts = tuple(dataclasses.replace(e, path=swap(e.path)) for e in recipe.experts)
    tokenizer = swap(recipe.tokenizer_source) if recipe.tokenizer_source else None
    return dataclasses.replace(
        recipe, base=swap(recipe.base), experts=experts, slices=slices, tokenizer_source=tokenizer, origins=origins
    )


class RemoteInputs:
    def __init__(self, recipe: Recipe, quiet: bool = True):
        self.models: dict[str, hub.HubModel] = {}
        self.stage_root: str | None = None
        self.planning = self.recipe = recipe
        refs = references(recipe)
        if not refs:
            return
        recipe.validate()  # a mistyped method or parameter is refused before the Hub is asked
        problems = []
        for ref in refs:
            try:
                self.models[ref] = hub.resolve(ref)
            except InputError as exc:
                problems.append(str(exc))
        collect(problems, InputError, "Hub inputs")
        origins = tuple((m.snapshot, f"{m.repo}@{m.commit}") for m in self.models.values())
        self.recipe = with_paths(recipe, {r: m.snapshot for r, m in self.models.items()}, origins)
        self.planning = self.recipe
        if any(m.missing for m in self.models.values()):
            self.stage_root = tempfile.mkdtemp(prefix="streammerge-hub-")
            try:
                with self.named():
                    staged = {r: hub.stage(m, self.stage_root, quiet) for r, m in self.models.items()}
            except BaseException:
                self.close()
                raise
            self.planning = with_paths(recipe, staged, origins)

    @contextmanager
    def named(self) -> Iterator[None]:
        """Errors name a Hub input by its repo id, not by the folder it is read from."""
        try:
            yield
        except StreammergeError as exc:
            message = str(exc)
            for ref, m in self.models.items():
                message = message.replace(m.snapshot, ref)
            if self.stage_root is not None:
                message = message.replace(self.stage_root + os.sep, "")
            if message == str(exc):
                raise
            raise type(exc)(message) from None

    @property
    def download_bytes(self) -> int:
        return sum(m.sizes.get(n, 0) for m in self.models.values() for n in m.missing)

    def download_line(self) -> str | None:
        files = [n for m in self.models.values() for n in m.missing]
        if not files:
            return None
        cache = hub.hub_client().constants.HF_HUB_CACHE
        return (f"to download: {len(files)} weight file(s), {format_size(self.download_bytes)}, into {cache} "
                f"({format_size(free_disk(cache))} free)")  # fmt: skip

    def check_disk(self, out: str, out_bytes: int) -> None:
        """The downloads fit in the cache, and beside the output where both share a disk."""
        if not self.download_bytes:
            return
        cache = hub.hub_client().constants.HF_HUB_CACHE
        need = self.download_bytes
        if os.stat(existing_folder(cache)).st_dev == os.stat(existing_folder(out)).st_dev:
            need += out_bytes
        if need > free_disk(cache):
            raise ResourceError(
                f"{cache}: the downloads need {format_size(self.download_bytes)}"
                + (f" and the output {format_size(out_bytes)}" if need > self.download_bytes else "")
                + f", {format_size(free_disk(cache))} is free (set HF_HUB_CACHE to a larger disk)"
            )

    def fetch(self, quiet: bool) -> Recipe:
        """Every weight file into the cache (a partial one resumed); the recipe of the cache folders."""
        with self.named():
            for m in self.models.values():
                for name in m.missing:
                    hub.download(m, name, quiet)
        self.planning = self.recipe
        return self.recipe

    def close(self) -> None:
        if self.stage_root is not None:
            shutil.rmtree(self.stage_root, ignore_errors=True)
            self.stage_root = None
