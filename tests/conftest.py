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
