"""The CLI starts without heavy imports, and conversion never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import qwen2moe_config, qwen2moe_tensors, write_checkpoint

HEAVY = ("numpy", "torch", "transformers", "gguf", "rich", "safetensors")


def imported_after(code: str) -> list[str]:
    probe = f"""
import sys, json
{code}
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_help_imports_nothing_heavy():
    assert imported_after("from gguforge.cli import main\nmain(['--help'])") == []


def test_conversion_does_not_import_torch(tmp_path):
    config = qwen2moe_config()
    model = write_checkpoint(tmp_path / "m", config, qwen2moe_tensors(config))
    out = tmp_path / "x.gguf"
    loaded = imported_after(f"from gguforge.cli import main\nassert main(['convert-hf', {str(model)!r}, "
                            f"'--outfile', {str(out)!r}, '--quiet', '--outtype', 'q8_0']) == 0")
    assert out.is_file()
    assert "torch" not in loaded and "transformers" not in loaded
