"""An expert is a model folder, a PEFT LoRA adapter or a PEFT OFT adapter; all read the same way:
`get(name)` gives the expert's dense weight for a base tensor name, computed when read."""

from __future__ import annotations

from typing import Union

from ..errors import InputError
from .checkpoint import Checkpoint, load_json
from .peft_adapter import CONFIG_NAME, is_adapter_folder
from .peft_lora import LoraExpert
from .peft_oft import OftExpert

ExpertSource = Union[Checkpoint, LoraExpert, OftExpert]


def open_expert(path: str, base: Checkpoint, peft_version: str | None = None) -> ExpertSource:
    if is_adapter_folder(path):
        config = load_json(f"{path}/{CONFIG_NAME}")
        kind = str(config.get("peft_type", "")).upper() if isinstance(config, dict) else ""
        if kind == "LORA":
            return LoraExpert(path, base)
        if kind == "OFT":
            return OftExpert(path, base, peft_version)
        raise InputError(f"{path}/{CONFIG_NAME}: peft_type {kind or None!r} is not supported (LORA and OFT are)")
    return Checkpoint.open(path)
