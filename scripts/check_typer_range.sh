#!/usr/bin/env bash
# Run the command-line tests against the oldest and the newest typer that pyproject.toml allows.
# typer 0.19-0.25 raise click's own exceptions; 0.26 and later raise those of the click copy they
# vendor (typer._click). gguforge.cli catches both families; this checks it on a real install of each.
# Usage: scripts/check_typer_range.sh   (needs network access to PyPI, or a local index, once)
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST=${OLDEST:-0.19.2}
NEWEST=${NEWEST:-0.29.2}
TESTS=(tests/test_hostile.py tests/test_interrupt.py tests/test_startup.py tests/test_bad_inputs.py)
for version in "$OLDEST" "$NEWEST"; do
    target=$(mktemp -d)
    trap 'rm -rf "$target"' EXIT
    python -m pip install --quiet --no-deps --target "$target" "typer==$version"
    echo "== typer $version"
    PYTHONPATH="$target" python -c "import typer, sys; assert typer.__file__.startswith('$target'), typer.__file__"
    PYTHONPATH="$target" python -m pytest -q -p no:cacheprovider "${TESTS[@]}"
    rm -rf "$target"
done
