"""Image classification: `pixel_values` (made by a `preprocess` function, e.g. an image processor) and one label per
image."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import Task


@dataclass(frozen=True)
class ImageClassification(Task):
    """One label per image: the split holds `pixel_values` (or `preprocess` makes them) and `label`."""

    def collate(self, tokenizer=None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        def collate_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
            return {
                "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
                "labels": torch.tensor([e["labels"] for e in examples]),
            }

        return collate_batch
