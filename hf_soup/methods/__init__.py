"""Data-free merge methods, one file each; importing this package registers them."""

from . import uniform, weighted  # noqa: F401  (registration)
from .registry import CONTEXT, METHODS, Method, get_method, list_methods, register_method

__all__ = ["CONTEXT", "METHODS", "Method", "get_method", "list_methods", "register_method"]
