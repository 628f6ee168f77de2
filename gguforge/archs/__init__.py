"""Architecture registry.

Classes register the Hugging Face architecture names they convert with
@register(...). Built-in modules are imported on first lookup; third-party
packages add theirs through the entry-point group "gguforge.archs".
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

import gguf

from ..errors import UserError

# Modules of this package that are not architectures (everything else is one, found automatically).
SUPPORT_MODULES = frozenset({"api", "base", "mock", "options", "rules", "shapes", "vision"})
ENTRY_POINT_GROUP = "gguforge.archs"

_registry: dict[str, type] = {}
_loaded = False


def builtin_modules() -> list[str]:
    """The architecture modules shipped in this package: every module but the support ones."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SUPPORT_MODULES)


def register(*hf_architectures: str):
    """Class decorator: convert checkpoints whose config names one of `hf_architectures` with this class.
    Its gguf_arch must be an architecture gguf-py (and so llama.cpp) knows, or the class must define the
    names gguf-py lacks itself (defines_gguf_arch, e.g. qwen4exp: checked against llama.cpp's constants.py)."""
    def add(cls):
        if cls.gguf_arch not in gguf.MODEL_ARCH_NAMES.values() and not cls.__dict__.get("defines_gguf_arch"):
            raise TypeError(f"{cls.__name__}.gguf_arch {cls.gguf_arch!r} is not an architecture gguf-py knows")
        for name in hf_architectures:
            _registry[name] = cls
        cls.hf_architectures = tuple(dict.fromkeys(cls.__dict__.get("hf_architectures", ()) + hf_architectures))
        return cls
    return add


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in builtin_modules():
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{module}":
                raise
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()  # importing the plugin runs its @register decorators
        except Exception as e:  # a broken plugin must not look like a gguforge bug
            raise UserError(f"architecture plugin {ep.name!r} ({ep.value}) failed to load: "
                            f"{type(e).__name__}: {e}", hint="fix or uninstall the plugin package") from None


def registered() -> dict[str, type]:
    _load_all()
    return dict(sorted(_registry.items()))


def architecture_name(config: dict) -> str:
    """architectures[0], unless a nested text config names its own architecture."""
    from ..checkpoint.read import text_config
    text_archs = text_config(config).get("architectures")
    archs = text_archs if isinstance(text_archs, list) and text_archs else config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise UserError("config.json has no 'architectures' list",
                        hint="supported: " + ", ".join(registered()))
    return archs[0]


def lookup(config: dict) -> type:
    name = architecture_name(config)
    classes = registered()
    if name not in classes:
        raise UserError(f"architecture {name!r} is not supported; supported: {', '.join(classes)}")
    return classes[name]
