"""Shared fixtures: mock HF checkpoints built once per argument set per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))  # make `import make_mocks` work in tests


@pytest.fixture(scope="session")
def mock_model(tmp_path_factory):
    """Factory: mock_model(arch, layout="causal", dtype=None, size="tiny", seed=0, **kw) -> Path.

    Same arguments -> same directory (built once per session); treat it as read-only.
    Needs torch + transformers (tests using it should importorskip("torch")).
    """
    import make_mocks

    cache: dict[tuple, Path] = {}

    def build(arch: str, layout: str = "causal", dtype: str | None = None, size: str = "tiny",
              seed: int = 0, **kw) -> Path:
        key = (arch, layout, dtype, size, seed, repr(sorted(kw.items())))  # (values may be dicts)
        if key not in cache:
            name = "-".join(str(x) for x in key[:5]) + "".join(f"-{k}" for k in sorted(kw)) + f"-{len(cache)}"
            out = tmp_path_factory.mktemp("mocks") / name
            cache[key] = make_mocks.make_mock(arch, out, layout=layout, dtype=dtype, size=size, seed=seed, **kw)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def trained_model():
    """A small Qwen3 (q256 mock) trained on structured English: learned structure, for tests where random
    weights make every quant look alike. Built once per recipe, cached across sessions
    (scripts/trained_mock.py); its folder also holds train.txt and a held-out eval.txt."""
    pytest.importorskip("torch")
    import trained_mock
    return trained_mock.trained_model()


@pytest.fixture(scope="session")
def tree():
    """llama.cpp's source tree (from the llama-cpp-python sdist) for its convert_hf_to_gguf.py."""
    from helpers import llama_cpp_tree
    found = llama_cpp_tree()
    if found is None:
        pytest.skip("llama.cpp source (llama-cpp-python sdist) could not be fetched from PyPI")
    return found


@pytest.fixture(scope="module")
def quiet_llama():
    """llama.cpp logs every tensor to stderr: silence it for a module, then restore its logger."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp._logger import llama_log_callback

    @llama_cpp.llama_log_callback
    def ignore(level, text, data):
        pass

    llama_cpp.llama_log_set(ignore, ctypes.c_void_p(0))
    yield
    llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
