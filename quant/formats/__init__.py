"""Registered quantization formats. Importing this package registers them all."""

from quant.formats._base import RUNTIMES, Format, RuntimeMapping, format_names, get_format, register_format
from quant.formats._options import FormatOptions, NoOptions
from quant.formats import rtn  # noqa: F401  (registers "rtn")
from quant.formats import gptq  # noqa: F401  (registers "gptq")
from quant.formats import lloyd  # noqa: F401  (registers "lloyd")
from quant.formats import ternary  # noqa: F401  (registers "ternary")
from quant.formats import turbo  # noqa: F401  (registers "turbo")
from quant.formats import vq  # noqa: F401  (registers "vq")
from quant.formats import gguf  # noqa: F401  (registers llama.cpp's block types "q8_0" .. "q4_k" .. "tq2_0")

__all__ = ["Format", "FormatOptions", "NoOptions", "RUNTIMES", "RuntimeMapping", "format_names", "get_format",
           "register_format"]
