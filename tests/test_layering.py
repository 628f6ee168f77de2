"""One-way layers: the import graph, what each command loads, and architectures checked against gguf-py."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gguforge"
# Modules that every layer may use: the error type, the row-chunk scheduler, deferred signals.
BASE = {"errors", "parallel", "signals"}
# Sub-packages from the bottom up; a package may import only those below it (and BASE).
LAYERS = ["format", "quantize", "checkpoint", "archs", "convert", "imatrix", "eval"]


def module_imports() -> dict[str, set[str]]:
    """{'gguforge.x.y': {'gguforge.a.b', ...}} from the source, resolving relative imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        here = parts if is_pkg else parts[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                if target.startswith("gguforge"):
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in node.names)  # `from . import x`
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("gguforge"))
        graph[".".join(parts)] = found
    return graph


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_import_graph_has_no_cycles_between_packages():
    graph = module_imports()
    edges = {(package_of(a), package_of(b)) for a, bs in graph.items() for b in bs
             if package_of(b) in graph.get(f"gguforge.{package_of(b)}", ()) or f"gguforge.{package_of(b)}" in graph}
    edges = {(a, b) for a, b in edges if a != b and a and b}
    for a, b in edges:
        if a in LAYERS and b in LAYERS:
            assert LAYERS.index(b) < LAYERS.index(a), f"{a} imports {b}, which sits above it"
        if a in LAYERS:
            assert b in LAYERS or b in BASE, f"{a} imports {b}"
    # and therefore no cycles; check directly too
    pkgs = {a for a, _ in edges} | {b for _, b in edges}
    reach = {p: {b for a, b in edges if a == p} for p in pkgs}
    for _ in pkgs:
        reach = {p: r | {c for q in r for c in reach.get(q, ())} for p, r in reach.items()}
    assert not [p for p, r in reach.items() if p in r]


def test_format_layer_imports_nothing_else_of_gguforge():
    graph = module_imports()
    for module, deps in graph.items():
        if module.startswith("gguforge.format"):
            assert {d for d in deps if not d.startswith(("gguforge.format", "gguforge.errors", "gguforge.signals"))} == set(), module


@pytest.mark.parametrize("command", [
    ["quantize", "{src}", "{out}", "Q8_0", "-q"],
    ["inspect", "{src}"],
    ["diff", "{src}", "{src}"],
])
def test_gguf_commands_load_no_conversion_or_architecture_module(tmp_path, command):
    src = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_block_count(1)
    import numpy as np
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    args = [a.format(src=src, out=tmp_path / "o.gguf") for a in command]
    code = ("import sys; from gguforge.cli import main\n"
            f"rc = main({args!r})\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('gguforge.convert', 'gguforge.archs', "
            "'gguforge.checkpoint', 'torch', 'transformers')))\n"
            "print('LOADED', bad); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout, r.stdout


def test_builtin_architectures_are_discovered_not_listed():
    from gguforge.archs import SUPPORT_MODULES, builtin_modules, registered
    files = {p.stem for p in (PACKAGE / "archs").glob("*.py")} - {"__init__"}
    assert set(builtin_modules()) == files - SUPPORT_MODULES  # every other file is an architecture module
    # ... and each of them registers something (a support module missing from SUPPORT_MODULES would not)
    assert {cls.__module__.rsplit(".", 1)[1] for cls in registered().values()} == set(builtin_modules())


def test_gguf_arch_must_be_known_to_gguf_py():
    from gguforge.archs.api import DecoderArch, register

    with pytest.raises(TypeError, match="not an architecture gguf-py knows"):
        @register("NoSuchModelForCausalLM")
        class NoSuch(DecoderArch):
            gguf_arch = "nosucharch"
    from gguforge.archs import registered
    assert "NoSuchModelForCausalLM" not in registered()
    for name, cls in registered().items():  # (or defines the names itself: checked against llama.cpp's, see
        # tests/test_qwen4exp.py)
        assert cls.gguf_arch in gguf.MODEL_ARCH_NAMES.values() or cls.__dict__.get("defines_gguf_arch"), name


# Names llama.cpp reads that the pinned gguf-py does not list yet for the arch (MTP heads).
NEWER_THAN_GGUF_PY = {"nextn.eh_proj", "nextn.enorm", "nextn.hnorm", "nextn.shared_head_norm"}


def allowed_names(arch: str) -> set[str]:
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[enum]}


@pytest.mark.parametrize("arch,layout,extra", [
    ("qwen2", "causal", []), ("qwen3", "causal", []), ("qwen3moe", "causal", []), ("qwen3vl", "causal", []),
    ("qwen3vlmoe", "hub", []), ("qwen2moe", "causal", []), ("qwen3next", "hub", []), ("qwen35", "hub", []), ("qwen35moe", "hub", []),
    ("qwen35moe", "hub", ["--fuse-gate-up-exps", "--fuse-qkv"]),
])
def test_every_emitted_tensor_name_is_one_gguf_py_lists_for_the_arch(mock_model, arch, layout, extra, capsys):
    pytest.importorskip("torch")
    from gguforge.cli import main
    model = mock_model(arch, layout=layout)
    assert main(["convert-hf", str(model), "--dry-run", *extra]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith(("blk.", "token_",
                                                                                                 "output"))]
    assert names
    allowed = allowed_names(arch)
    for name in names:
        stem = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
        parts = stem.split(".")
        generic = ".".join(["blk", "{bid}", *parts[2:]]) if parts[0] == "blk" else stem
        assert generic in allowed or ".".join(parts[2:]) in NEWER_THAN_GGUF_PY, (arch, name)


def test_every_architecture_has_a_mock_so_it_joins_the_test_matrix():
    import make_mocks
    from gguforge.archs import registered
    assert set(make_mocks.ARCHS) == {make_mocks.mock_name(cls) for cls in registered().values()}


def test_dry_run_shows_each_tensors_named_ops(mock_model, capsys):
    pytest.importorskip("torch")
    from gguforge.cli import main
    assert main(["convert-hf", str(mock_model("qwen35")), "--dry-run"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("blk.0.")}
    assert lines["blk.0.ssm_a"].endswith("[TiledVHeads(rows) >> NegExp]")
    assert lines["blk.0.ssm_conv1d.weight"].endswith("[TiledVHeads(rows, after 64) >> Squeeze]")
    assert lines["blk.0.attn_norm.weight"].endswith("[AddOne]")
    assert lines["blk.0.ssm_out.weight"].endswith("[TiledVHeads(axis 1)]")
    assert "[" not in lines["blk.0.ssm_norm.weight"]
