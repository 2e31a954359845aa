"""Models named by Hugging Face Hub repo ids (`org/name`, `org/name@revision`): resolved to one
commit, read header first, their weights downloaded into the standard cache only when a merge needs
them.

Conventions, those of `huggingface_hub` (the `hub` extra), which reads them from the environment:
HF_HOME / HF_HUB_CACHE say where the cache is (`models--ORG--NAME/{refs,snapshots/COMMIT,blobs}`),
HF_ENDPOINT which server, HF_TOKEN who asks, HF_HUB_OFFLINE=1 that no request is made: a revision is
then resolved from `refs/` and every file must be in the cache. A local path that exists always
wins over a repo id of the same spelling.

Weights are downloaded by us, not by `hf_hub_download`, so that a killed download resumes: the bytes
go to `blobs/ETAG.streammerge.incomplete`, are checked against the ETag (the file's sha256 for LFS
files) and only then renamed into `blobs/` and linked from the snapshot, as `huggingface_hub` does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, UsageError
from .lock import exclusive_file
from .safetensors_format import MAX_HEADER_BYTES

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")
COMMIT = re.compile(r"[0-9a-f]{40}")
# the files a model is read from; everything else at the top of a repo is small (config, tokenizer)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot")
PARTIAL_SUFFIX = ".streammerge.incomplete"


def is_repo_id(ref: str) -> bool:
    """`org/name[@revision]` that is not an existing local path."""
    return REPO_ID.fullmatch(ref) is not None and not os.path.exists(ref)


def hub_client():
    """huggingface_hub, or a one-line error naming the extra."""
    try:
        import huggingface_hub
        import huggingface_hub.errors
        import huggingface_hub.file_download
        import huggingface_hub.utils

        for name in ("httpx", "httpx2"):  # a line per request is not progress
            logging.getLogger(name).setLevel(logging.WARNING)
    except ImportError:
        raise UsageError(
            "Hub repo ids need huggingface_hub: pip install 'streammerge[hub]' (or give a local folder)"
        ) from None
    return huggingface_hub


@dataclass
class HubModel:
    """One repo id resolved to a commit whose small files are in the cache."""

    ref: str  # as written
    repo: str
    revision: str
    commit: str
    snapshot: str  # the cache's snapshots/COMMIT folder
    weights: list[str]  # the files the model's tensors are read from
    sizes: dict[str, int] = field(default_factory=dict)  # of the weights not yet in the cache
    metas: dict[str, Any] = field(default_factory=dict)  # the Hub's size and ETag per file, asked once

    @property
    def missing(self) -> list[str]:
        return [w for w in self.weights if not os.path.isfile(os.path.join(self.snapshot, w))]

    @property
    def label(self) -> str:
        return f"{self.repo}@{self.commit[:12]}"


def _storage(hf, repo: str) -> str:
    return os.path.join(hf.constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"))


def _cached_commit(hf, repo: str, revision: str) -> str | None:
    if COMMIT.fullmatch(revision):
        return revision
    ref = os.path.join(_storage(hf, repo), "refs", revision)
    if os.path.isfile(ref):
        with open(ref) as f:
            return f.read().strip()
    return None


def _remote_commit(hf, ref: str, repo: str, revision: str) -> tuple[str, list[str]] | None:
    """The commit and top-level files the Hub has; None where it cannot be reached."""
    errors = hf.errors
    try:
        info = hf.HfApi().model_info(repo, revision=revision)
    except errors.RevisionNotFoundError:
        raise InputError(f"{ref}: the Hub has no revision {revision!r} of {repo}") from None
    except errors.GatedRepoError:
        raise InputError(f"{ref}: {repo} is gated; accept its terms on the Hub and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise InputError(
            f"{ref}: no such folder, and no repo {repo} on the Hub (or it is private: set HF_TOKEN)"
        ) from None
    except errors.HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 404:
            raise InputError(f"{ref}: no such folder, and no repo {repo} on the Hub") from None
        raise InputError(f"{ref}: the Hub refused: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        if not unreachable(exc):
            raise
        log.warning("%s: the Hub cannot be reached (%s); using the cache", ref, type(exc).__name__)
        return None
    files = [s.rfilename for s in info.siblings or () if "/" not in s.rfilename]
    return info.sha, files


def unreachable(exc: BaseException) -> bool:
    """A network failure (no route, refused, timed out), whatever the HTTP client's own classes."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"OSError", "ConnectionError", "TransportError", "TimeoutException", "RequestError"})


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """The Hub's refusals and network failures during `what` as one line each."""
    hf = hub_client()
    try:
        yield
    except hf.errors.HfHubHTTPError as exc:
        raise InputError(f"{what}: the Hub refused: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        if not unreachable(exc):
            raise
        raise InputError(f"{what}: the Hub cannot be reached ({type(exc).__name__}: {exc})") from None


def model_weights(folder: str, files: list[str], ref: str) -> list[str]:
    """Which of a repo's files hold the tensors (the small files are already in `folder`)."""
    from .checkpoint import INDEX_NAME, SINGLE_NAME, load_json
    from .peft_adapter import BIN_WEIGHTS_NAME, CONFIG_NAME, WEIGHTS_NAME
    from .torch_bin import BIN_INDEX_NAME, BIN_NAME

    if CONFIG_NAME in files:
        return [WEIGHTS_NAME] if WEIGHTS_NAME in files else [BIN_WEIGHTS_NAME] if BIN_WEIGHTS_NAME in files else []
    for index, single in ((INDEX_NAME, SINGLE_NAME), (BIN_INDEX_NAME, BIN_NAME)):
        if index in files:
            doc = load_json(os.path.join(folder, index))
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict):
                raise InputError(f"{ref}/{index}: no 'weight_map' object of tensor name -> file name")
            return sorted({str(v) for v in weight_map.values()})
        if single in files:
            return [single]
    raise InputError(f"{ref}: the repo has no {SINGLE_NAME}, {INDEX_NAME}, {BIN_NAME} or {CONFIG_NAME}")


def resolve(ref: str) -> HubModel:
    """The commit `ref` names now (the cache's record of it offline or when the Hub is unreachable),
    its small files fetched into the cache; no weight file is read."""
    hf = hub_client()
    repo, _, revision = ref.partition("@")
    revision = revision or "main"
    offline = hf.constants.HF_HUB_OFFLINE
    remote = None if offline else _remote_commit(hf, ref, repo, revision)
    if remote is None:
        commit = _cached_commit(hf, repo, revision)
        snapshot = os.path.join(_storage(hf, repo), "snapshots", commit or "-")
        if commit is None or not os.path.isdir(snapshot):
            why = "HF_HUB_OFFLINE=1 forbids downloading it" if offline else "and the Hub cannot be reached"
            raise InputError(
                f"{ref}: no such folder, and not in the Hugging Face cache {hf.constants.HF_HUB_CACHE} ({why})"
            )
        files = sorted(f for f in os.listdir(snapshot) if not f.startswith("."))
    else:
        commit, files = remote
        snapshot = os.path.join(_storage(hf, repo), "snapshots", commit)
        for name in files:
            if not name.endswith(WEIGHT_SUFFIXES) and name != ".gitattributes":
                if not os.path.isfile(os.path.join(snapshot, name)):
                    with hub_errors(f"{ref}/{name}"):
                        hf.hf_hub_download(repo, name, revision=commit)
    model = HubModel(ref, repo, revision, commit, snapshot, model_weights(snapshot, files, ref))
    if remote is None and model.missing:
        raise InputError(f"{ref}: {model.missing[0]} of commit {commit[:12]} is not in the cache and the Hub cannot "
                         "be asked (HF_HUB_OFFLINE=1 or no connection)")  # fmt: skip
    return model


def _url_and_size(hf, model: HubModel, name: str) -> tuple[str, object]:
    """The file's URL and the Hub's metadata for it (its size and ETag: fixed for a commit, so the
    header read and the download ask once)."""
    url = hf.hf_hub_url(model.repo, name, revision=model.commit)
    meta = model.metas.get(name)
    if meta is None:
        with hub_errors(f"{model.ref}/{name}"):
            meta = hf.get_hf_file_metadata(url)
        if meta.size is None or meta.etag is None:
            raise InputError(f"{model.ref}/{name}: the Hub gave no size or ETag for it")
        model.metas[name] = meta
    return url, meta


def read_header(model: HubModel, name: str) -> tuple[bytes, int]:
    """A safetensors file's first bytes (its 8-byte length and JSON header, at least) and its size,
    by ranged reads: no tensor data is requested."""
    hf = hub_client()
    url, meta = _url_and_size(hf, model, name)
    model.sizes[name] = meta.size

    def get(begin: int, end: int) -> bytes:
        with hub_errors(f"{model.ref}/{name}"):
            r = hf.utils.get_session().get(url, headers=hf.utils.build_hf_headers() | {"Range": f"bytes={begin}-{end}"})
            hf.utils.hf_raise_for_status(r)
        return r.content[: end - begin + 1]

    # the length first, then exactly the header: not one byte of tensor data leaves the server
    prefix = get(0, min(8, meta.size) - 1)
    if len(prefix) == 8:
        (n,) = struct.unpack("<Q", prefix)
        if 0 < n <= min(meta.size - 8, MAX_HEADER_BYTES):
            prefix += get(8, 8 + n - 1)
    return prefix, meta.size


class _Part:
    """A partial download and the sha256 of what it holds so far."""

    def __init__(self, f) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        f.seek(0)
        while block := f.read(1 << 24):
            self.sha.update(block)

    def write(self, chunk: bytes) -> None:
        self.f.write(chunk)
        self.sha.update(chunk)

    def restart(self) -> None:
        self.f.seek(0)
        self.f.truncate()
        self.sha = hashlib.sha256()


def _fetch_rest(hf, url: str, part: _Part, size: int, progress) -> None:
    """Append the file's bytes from where the part ends; a server that ignores the range starts it over."""
    done = part.f.tell()
    headers = hf.utils.build_hf_headers() | ({"Range": f"bytes={done}-"} if done else {})
    timeout = hf.constants.HF_HUB_DOWNLOAD_TIMEOUT
    with hf.utils.get_session().stream("GET", url, headers=headers, timeout=timeout) as r:
        if r.status_code >= 400:
            r.read()
            hf.utils.hf_raise_for_status(r)
        if done and r.status_code == 200:
            part.restart()
            progress.reset()
        for chunk in r.iter_bytes():  # as it arrives: a kill loses at most the file's write buffer
            part.write(chunk)
            progress.update(len(chunk))
            if part.f.tell() > size:
                break


def download(model: HubModel, name: str, quiet: bool, attempts: int = 3) -> None:
    """One weight file into the cache, resuming a partial download of it (from an earlier run or a
    dropped connection); its size and sha256 checked against the Hub's before it is used."""
    import sys

    from tqdm import tqdm

    hf = hub_client()
    url, meta = _url_and_size(hf, model, name)
    storage = _storage(hf, model.repo)
    blob = os.path.join(storage, "blobs", meta.etag)
    os.makedirs(os.path.dirname(blob), exist_ok=True)
    if not os.path.isfile(blob):
        part = blob + PARTIAL_SUFFIX
        with open(part, "a+b") as f, exclusive_file(f, part):
            sink = _Part(f)
            done = f.tell()
            log.info("%s/%s: downloading %d bytes%s", model.ref, name, meta.size - done,
                     f" (resuming at {done})" if done else "")  # fmt: skip
            with tqdm(total=meta.size, initial=done, unit="B", unit_scale=True, desc=name,
                      disable=quiet or not sys.stderr.isatty()) as progress:  # fmt: skip
                for attempt in range(attempts):
                    try:
                        _fetch_rest(hf, url, sink, meta.size, progress)
                        break
                    except (OSError, hf.errors.HfHubHTTPError) as exc:
                        raise InputError(f"{model.ref}/{name}: {str(exc).splitlines()[0]}") from None
                    except Exception as exc:  # the HTTP client's transport errors: resume where it stopped
                        if attempt == attempts - 1:
                            why = f"stopped at {f.tell()} of {meta.size} bytes ({type(exc).__name__})"
                            raise InputError(f"{model.ref}/{name}: the download {why}; rerun to resume it") from None
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        if size != meta.size or (len(meta.etag) == 64 and sink.sha.hexdigest() != meta.etag):
            os.remove(part)  # a corrupt part would be resumed again; start over next time
            raise InputError(f"{model.ref}/{name}: downloaded {size} bytes that do not match the Hub's size "
                             f"{meta.size} and sha256; rerun to download it again")  # fmt: skip
        os.replace(part, blob)
    link = os.path.join(model.snapshot, name)
    os.makedirs(model.snapshot, exist_ok=True)
    if not os.path.lexists(link):
        try:
            os.symlink(os.path.relpath(blob, model.snapshot), link)
        except OSError:  # no symlinks (Windows without developer mode): huggingface_hub copies too
            os.link(blob, link)
    if not COMMIT.fullmatch(model.revision):
        os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
        with open(os.path.join(storage, "refs", model.revision), "w") as f:
            f.write(model.commit)


def stage(model: HubModel, root: str, quiet: bool) -> str:
    """A folder under `root` that reads as the model for every check and plan without its weights:
    the cached files linked, each missing safetensors file as its header followed by a hole of the
    file's size (sparse: it takes no disk, and nothing reads past the header before the merge
    downloads the real file). A `.bin` file keeps its tensor table at its end, so it is downloaded."""
    folder = os.path.join(root, model.ref)
    os.makedirs(folder)
    for name in model.missing:
        if not name.endswith(".safetensors"):
            log.warning("%s/%s: a .bin checkpoint is read whole to be checked: downloading it first", model.ref, name)
            download(model, name, quiet)
    for name in sorted(os.listdir(model.snapshot)) if os.path.isdir(model.snapshot) else ():
        os.symlink(os.path.join(model.snapshot, name), os.path.join(folder, name))
    for name in model.missing:
        prefix, size = read_header(model, name)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(prefix)
            f.truncate(size)
    return folder
