"""Quantization: llama-quantize's presets and per-tensor type rules, and the native codecs.

The package is also the library function: `gguforge.quantize(IN, OUT, "Q4_K_M", ...)` calls
`quantize.api.quantize_file` (a module whose class has __call__, so the name works whether or not
the subpackage has been imported).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .api import quantize_file
        return quantize_file(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
