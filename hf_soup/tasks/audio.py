"""Audio classification (keyword spotting, speaker, emotion, sound events): one label per clip.

Raw rows hold `audio` and `label` (`evaluation.columns`). Each clip is `{"array": [...], "sampling_rate": ...}`, the
shape a `datasets.Audio` column decodes to; its sampling rate must be the feature extractor's (resampling is the
data's job: `cast_column(..., Audio(sampling_rate=...))`). Clips are cut to `max_length_seconds` when one is given,
turned into model inputs by the feature extractor saved with the model (`preprocessor_config.json`), and batched
with its `pad` (its padding value, and an `attention_mask` where the extractor returns one), as
`DataCollatorWithPadding(feature_extractor)` batches them for a `Trainer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import SoupError, brief, first_line
from .base import Task, column_lengths, require_columns
from .logits import CLASS_METRICS, MetricFunction

AUDIO_INPUTS = ("input_values", "input_features", "attention_mask")


@dataclass(frozen=True)
class AudioClassification(Task):
    """One label per clip: raw columns `audio` (a clip per row) and `label` (`evaluation.columns`)."""

    column_keys: ClassVar[Mapping[str, str | None]] = {"audio": "audio", "label": "label"}
    processing: ClassVar[str] = "feature_extractor"

    @property
    def metrics(self) -> dict[str, tuple[MetricFunction, bool]]:
        return dict(CLASS_METRICS)

    def set_max_length_seconds(self, seconds: float | None) -> None:
        """Cut every clip to its first `seconds` (`evaluation.max_length_seconds`; default: whole clips)."""
        if seconds is not None and not 0 < seconds < math.inf:
            raise SoupError(f"max_length_seconds must be a number of seconds > 0, got {brief(seconds)}")
        self._bound["seconds"] = seconds

    def preprocess(self, dataset, *, split: str, tokenizer=None, columns: Mapping[str, str], max_length=None):
        audio, label = self.column(columns, "audio"), self.column(columns, "label")
        names = set(dataset.column_names)
        if names & {"input_values", "input_features"} and audio not in names:
            return self.finish(dataset, split=split, columns=columns)  # already turned into model inputs
        require_columns(dataset, {"audio": audio, "label": label}, split=split)
        extractor = feature_extractor(tokenizer)
        rate, seconds = extractor.sampling_rate, self._bound.get("seconds")
        limit = None if seconds is None else max(1, round(seconds * rate))
        model_input = extractor.model_input_names[0]

        def extract(batch, indices):
            clips = [clip_array(batch[audio], offset, row, rate, split) for offset, row in enumerate(indices)]
            for offset, value in enumerate(batch[label]):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise SoupError(
                        f"split {brief(split)} row {indices[offset]}: the label must be a class id (an integer ≥ 0), "
                        f"got {brief(value)}; name the label column in evaluation.columns.label"
                    )
            encoded = extractor([clip[:limit] for clip in clips], sampling_rate=rate)
            return {model_input: encoded[model_input], "labels": batch[label]}

        try:
            processed = dataset.map(extract, batched=True, with_indices=True, remove_columns=dataset.column_names)
        except ImportError as error:  # a datasets.Audio column of files, without the package that decodes them
            raise SoupError(
                f"split {brief(split)}: the audio column {brief(audio)} cannot be decoded ({first_line(error)}); "
                "pip install torchcodec, or give decoded clips: {'array': [...], 'sampling_rate': ...} per row"
            ) from None
        return self.finish(processed, split=split, columns=columns)

    def lengths(self, dataset) -> list[int] | None:
        """Each clip's length along the axis its batch is padded on: samples (`input_values`) or frames
        (`input_features` of extractors that pad them, e.g. Speech2Text's; Whisper's are all one length); `None`
        when the extractor gives no `attention_mask` (wav2vec2-base style models see the zero padding)."""
        column = next((c for c in ("input_values", "input_features") if c in dataset.column_names), None)
        if column is None or "attention_mask" not in dataset.column_names:
            return None
        return column_lengths(dataset, column)

    def collate(self, tokenizer=None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Batch clips with the feature extractor's `pad`; without one (inputs made by `evaluation.preprocess`), each
        input right-padded with zeros."""
        extractor = None if tokenizer is None else feature_extractor(tokenizer)

        def collate_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
            inputs = [{k: v for k, v in e.items() if k in AUDIO_INPUTS} for e in examples]
            batch = dict(extractor.pad(inputs, return_tensors="pt")) if extractor else zero_padded(inputs)
            batch["labels"] = torch.tensor([e["labels"] for e in examples])
            return batch

        return collate_batch


def feature_extractor(processing: Any):
    """The audio feature extractor of `processing` (a feature extractor, or a processor holding one); refused with
    the fix when there is none."""
    extractor = getattr(processing, "feature_extractor", processing)
    if extractor is None or not isinstance(getattr(extractor, "sampling_rate", None), int):
        got = "none was found" if processing is None else f"got a {type(processing).__name__}"
        raise SoupError(
            f"audio-classification turns clips into model inputs with the model's feature extractor, but {got}; save "
            "it beside the model (feature_extractor.save_pretrained(folder) writes preprocessor_config.json) in the "
            "base model or the first ingredient"
        )
    return extractor


def clip_array(clips: list, offset: int, row: int, rate: int, split: str) -> np.ndarray:
    """The samples of clip `offset` of a batch (row `row` of the split), checked: one channel, sampled at `rate`."""
    clip, where = clips[offset], f"split {brief(split)} row {row}"
    try:
        array, found = clip["array"], clip["sampling_rate"]
    except (TypeError, KeyError, IndexError):
        raise SoupError(
            f"{where}: an audio clip must be {{'array': [...], 'sampling_rate': ...}} (what a datasets.Audio column "
            f"decodes to), got {brief(clip)}; name the audio column in evaluation.columns.audio"
        ) from None
    if found != rate:
        raise SoupError(
            f"{where}: the audio is sampled at {brief(found)} Hz but the feature extractor expects {rate} Hz; "
            f"resample it, e.g. dataset.cast_column('audio', datasets.Audio(sampling_rate={rate})), which resamples "
            "as it decodes"
        )
    try:
        array = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError):
        raise SoupError(f"{where}: the audio array must hold numbers (samples), got {brief(array)}") from None
    if array.ndim != 1 or array.size == 0:
        raise SoupError(
            f"{where}: an audio clip must be one channel of samples (a non-empty 1-D array), got shape "
            f"{tuple(array.shape)}; mix it down to mono first (datasets.Audio(num_channels=1))"
        )
    return array


def zero_padded(inputs: list[dict]) -> dict[str, torch.Tensor]:
    """Every input of `inputs` right-padded with zeros along its first axis to the longest."""
    batch = {}
    for key in inputs[0]:
        values = [torch.as_tensor(np.asarray(e[key])) for e in inputs]
        batch[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True)
    return batch
