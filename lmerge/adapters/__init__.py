"""PEFT LoRA adapters: load, validate, resolve, align keys, save merged results."""

from lmerge.adapters.lora import LoraAdapter
from lmerge.adapters.resolve import resolve_adapters

__all__ = ["LoraAdapter", "resolve_adapters"]
