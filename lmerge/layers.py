"""Layer indices parsed from module keys."""

from __future__ import annotations

import re

# Numbered containers used by transformers models: BERT "layer.3", Llama "layers.3", GPT-2 "h.3",
# T5 "block.3", ViT/CLIP "layers.3"/"blocks.3".
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")


def layer_index(key: str) -> int | None:
    """The layer number in a module key (``...layer.3.attention...`` -> 3), ``None`` if none."""
    match = _LAYER.search(key)
    return int(match.group(1)) if match else None
