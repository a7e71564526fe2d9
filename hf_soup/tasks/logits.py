"""Metrics over `(logits, labels)` batches of models with one prediction per example (or per next token, for causal
language models): accuracy, macro F1, cross-entropy loss and perplexity, computed here, offline."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

Batches = list[tuple[torch.Tensor, torch.Tensor]]  # (logits, labels) per batch, on the CPU, in split order
MetricFunction = Callable[[Batches, bool], float]  # (batches, causal) → the number


def lm_pairs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits and targets, padding (-100) dropped."""
    logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = labels != -100
    return logits[keep], labels[keep]


def flat(batches: Batches, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of a split, one row per prediction."""
    pairs = [lm_pairs(lg, lb) if causal else (lg, lb) for lg, lb in batches]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def accuracy(batches: Batches, causal: bool) -> float:
    """The share of right argmax predictions (counted in float64: exactly right / total)."""
    logits, labels = flat(batches, causal)
    return float((logits.argmax(-1) == labels).double().mean())


def macro_f1(batches: Batches, causal: bool) -> float:
    logits, labels = flat(batches, causal)
    predictions = logits.argmax(-1)
    scores = []
    for label in torch.unique(torch.cat([labels, predictions])):
        tp = ((predictions == label) & (labels == label)).sum().item()
        fp = ((predictions == label) & (labels != label)).sum().item()
        fn = ((predictions != label) & (labels == label)).sum().item()
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def loss(batches: Batches, causal: bool) -> float:
    logits, labels = flat(batches, causal)
    return float(torch.nn.functional.cross_entropy(logits, labels))


def perplexity(batches: Batches, causal: bool) -> float:
    return math.exp(loss(batches, causal))


# name → (function, greater_is_better)
LOGIT_METRICS: dict[str, tuple[MetricFunction, bool]] = {
    "accuracy": (accuracy, True),
    "next_token_accuracy": (accuracy, True),
    "macro_f1": (macro_f1, True),
    "loss": (loss, False),
    "perplexity": (perplexity, False),
}
# the ones that mean something for one prediction per example (classifiers, multiple choice)
CLASS_METRICS = {name: LOGIT_METRICS[name] for name in ("accuracy", "macro_f1", "loss")}
