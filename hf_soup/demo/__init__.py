"""The end-to-end demo (`hf-soup demo`): a real pretrained model and real data, through the public API only."""

from .data import vader_splits
from .run import SIZES, Size, run_demo

__all__ = ["SIZES", "Size", "run_demo", "vader_splits"]
