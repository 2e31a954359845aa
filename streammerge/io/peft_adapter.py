"""What every PEFT adapter folder shares: adapter_config.json, adapter_model.safetensors, and
keys `base_model.model.<module path>.<suffix>` naming modules of the base model."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from ..errors import InputError
from .checkpoint import Checkpoint, file_identity, load_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"  # older PEFT versions' torch.save file
PREFIX = "base_model.model."


def is_adapter_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG_NAME))


@dataclass
class AdapterFiles:
    folder: str
    config: dict
    config_sha256: str
    tensors: Checkpoint  # the adapter's safetensors file, read lazily

    @classmethod
    def open(cls, folder: str) -> "AdapterFiles":
        folder = os.path.abspath(folder)
        config_path = os.path.join(folder, CONFIG_NAME)
        config = load_json(config_path)
        if not isinstance(config, dict):
            raise InputError(f"{config_path}: not a JSON object")
        weights = os.path.join(folder, WEIGHTS_NAME)
        if not os.path.isfile(weights) and os.path.isfile(os.path.join(folder, BIN_WEIGHTS_NAME)):
            weights = os.path.join(folder, BIN_WEIGHTS_NAME)  # read without unpickling (torch_bin.py)
        if not os.path.isfile(weights):
            raise InputError(f"{folder}: no {WEIGHTS_NAME} or {BIN_WEIGHTS_NAME}")
        with open(config_path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        return cls(folder, config, sha, Checkpoint.open_file(weights))

    @property
    def path(self) -> str:
        return self.tensors.files[0]

    def modules(self, suffixes: tuple[str, ...]) -> dict[str, dict[str, str]]:
        """module path -> {suffix: key} for keys ending in one of `suffixes`."""
        out: dict[str, dict[str, str]] = {}
        for key in self.tensors.names():
            for suffix in suffixes:
                if key.endswith("." + suffix):
                    module = key[: -len(suffix) - 1]
                    module = module[len(PREFIX) :] if module.startswith(PREFIX) else module
                    out.setdefault(module, {})[suffix] = key
                    break
        return out

    def unknown_keys(self, suffixes: tuple[str, ...]) -> list[str]:
        """Keys that are neither adapter parameters nor absolute copies of base layers."""
        return [
            k
            for k in self.tensors.names()
            if not any(k.endswith("." + s) for s in suffixes) and ".base_layer." not in k
        ]

    def fingerprint(self) -> dict:
        header = self.tensors.headers[self.path]
        return {
            self.path: file_identity(self.path) | {"header_sha256": hashlib.sha256(header.raw).hexdigest()},
            os.path.join(self.folder, CONFIG_NAME): {"sha256": self.config_sha256},
        }


class AdapterExpert:
    """What LoRA and OFT experts share: the adapter's files, the base it applies to, the
    modules it adapts (base weight name -> module), and the problems found while reading it."""

    def __init__(self, folder: str, base: Checkpoint):
        self.files = AdapterFiles.open(folder)
        self.folder = self.files.folder
        self.base = base
        self.modules: dict = {}
        self.problems: list[str] = []

    def problems_against(self, base: Checkpoint) -> list[str]:
        return list(self.problems)

    def file_of(self, name: str) -> str:
        return self.files.path if name in self.modules else self.base.file_of(name)

    def fingerprint(self) -> dict:
        return self.files.fingerprint()

    def close(self) -> None:
        self.files.tensors.close()


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching the module path's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default
