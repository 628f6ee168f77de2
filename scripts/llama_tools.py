"""Build llama.cpp's command-line tools (llama-quantize, llama-imatrix, ...) for tests and benchmarks.

The source is llama.cpp as vendored in the llama-cpp-python sdist the project pins (the same tree
the Python binding is built from), downloaded from PyPI once. The build is cached under the user
cache dir (~/.cache/gguforge-tests/llama-tools/<sdist>), so a warm CI run does not rebuild; a
file lock makes concurrent test processes wait for one build instead of racing.

    python scripts/llama_tools.py [TOOL ...]     # build (if needed) and print the paths

The Python binding cannot pass an importance matrix to llama_model_quantize (its params take a
pointer to a C++ vector), so imatrix tests run the tools as programs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
CACHE = Path(os.environ.get("GGUFORGE_TEST_CACHE", Path.home() / ".cache" / "gguforge-tests"))
DEFAULT_TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")

# Only what the tools need: no server (its web UI needs npm), no tests/examples, no network code.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DGGML_NATIVE=ON",
)


def sdist_archive(cache: Path = CACHE) -> Path:
    """The pinned llama-cpp-python sdist (llama.cpp's source under vendor/llama.cpp), downloaded once.

    `--no-binary` names the package only: with `:all:` pip would also build the sdist's build
    dependencies from source (cmake itself, tens of minutes) just to read its metadata."""
    cache.mkdir(parents=True, exist_ok=True)
    archives = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        SDIST, "-d", str(cache)], check=True, capture_output=True, text=True)
        archives = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise RuntimeError(f"pip download {SDIST} gave no sdist in {cache}")
    return archives[-1]


def _source_tree(root: Path) -> Path:
    """The whole vendored llama.cpp tree, unpacked under `root` once."""
    tree = root / "src"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    archive = sdist_archive()
    prefix = archive.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    staging = root / "src.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and len(m.name) > len(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(staging, members=members, filter="data")
    staging.rename(tree)
    return tree


def _cmake() -> str:
    """cmake from this Python's scripts dir (the `cmake` wheel the test extra installs), else PATH."""
    import sysconfig
    local = Path(sysconfig.get_path("scripts")) / "cmake"
    found = str(local) if local.is_file() else shutil.which("cmake")
    if not found:
        raise RuntimeError("cmake is needed to build llama.cpp's tools: pip install cmake")
    return found


def build_dir() -> Path:
    return CACHE / "llama-tools" / SDIST.replace("==", "-")


def source_tree() -> Path:
    """The whole vendored llama.cpp tree (unpacked once, under the build lock), for tests that read its
    sources and test data without building anything."""
    root = build_dir()
    root.mkdir(parents=True, exist_ok=True)
    if (root / "src" / "CMakeLists.txt").is_file():
        return root / "src"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _source_tree(root)


def llama_tools(*names: str) -> dict[str, Path]:
    """Paths of the named tools, building the missing ones (cmake; minutes on a cold cache)."""
    names = names or DEFAULT_TOOLS
    root = build_dir()
    root.mkdir(parents=True, exist_ok=True)
    bin_dir = root / "build" / "bin"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait and reuse it
        missing = [n for n in names if not (bin_dir / n).is_file()]
        if missing:  # the other default tools too: they share libllama, so one cmake run builds all cheaply
            missing += [n for n in DEFAULT_TOOLS if n not in missing and not (bin_dir / n).is_file()]
            tree = _source_tree(root)
            build = root / "build"
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            cmake = _cmake()
            subprocess.run([cmake, "-S", str(tree), "-B", str(build), *gen, *CMAKE_OPTIONS],
                           check=True, capture_output=True, text=True)
            jobs = str(os.cpu_count() or 2)
            r = subprocess.run([cmake, "--build", str(build), "--target", *missing, "-j", jobs],
                               capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"building {missing} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return {n: bin_dir / n for n in names}


if __name__ == "__main__":
    for name, path in llama_tools(*sys.argv[1:]).items():
        print(f"{name}\t{path}")
