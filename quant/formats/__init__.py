"""Registered quantization formats. Importing this package registers them all."""

from quant.formats._base import Format, format_names, get_format, register_format
from quant.formats import rtn  # noqa: F401  (registers "rtn")

__all__ = ["Format", "format_names", "get_format", "register_format"]
