"""PEFT LoRA adapters: load and validate them, and align their module keys (reading only)."""

from lmerge.adapters.lora import LoraAdapter

__all__ = ["LoraAdapter"]
