"""Data-free merge methods, one file each; importing this package registers them."""

from . import (  # noqa: F401  (registration)
    dare,
    ema,
    fisher,
    model_stock,
    multislerp,
    passthrough,
    regmean,
    slerp,
    task_arithmetic,
    ties,
    uniform,
    weighted,
)
from .registry import CONTEXT, METHODS, Method, get_method, list_methods, register_method

__all__ = ["CONTEXT", "METHODS", "Method", "get_method", "list_methods", "register_method"]
