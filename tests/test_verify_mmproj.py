"""`verify MODEL FILE.gguf --mmproj MMPROJ.gguf`: llama.cpp's mtmd image embeddings against the
checkpoint's vision tower in transformers, on the same pixels.

Measured on these mocks (48x32 synthetic image, 24 merged tokens), gguforge's mmproj and llama.cpp's
converter's through the same code path (the files are byte-identical, so the figures are too):
                                                    still image      two frames
  Qwen3-VL (merger + 1 deepstack, float32 weights): f32 2.5e-7, f16 3.7e-7; f32 2.2e-7, f16 3.5e-7
  Qwen3.5 (no deepstack, bf16 weights):             f32 1.8e-7, f16 2.3e-7; f32 1.7e-7, f16 2.3e-7
(q8_0: 1.3e-4 to 1.6e-4.) The residual is mtmd's arithmetic.
Planted converter bugs: a wrong image mean ~8e-2, a spatially transposed patch kernel ~4e-1, swapped
temporal patch kernels invisible on the still image but far above the default threshold (1e-3) on
two frames.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from gguforge.cli import main

from helpers import run_reference_converter

pytest.importorskip("torch")
pytest.importorskip("llama_cpp.mtmd_cpp")

from gguforge import verify_vision as V  # noqa: E402

CASES = {"qwen3vl": dict(layout="causal", full_precision=True), "qwen35": dict(layout="hub")}


@pytest.fixture(scope="module")
def converted(mock_model, tmp_path_factory):
    """converted(arch, outtype, who="ours"|"ref") -> (model, text GGUF, mmproj), built once each."""
    cache = {}

    def build(arch: str, outtype: str = "f32", who: str = "ours"):
        key = (arch, outtype, who)
        if key not in cache:
            model = mock_model(arch, **CASES[arch])
            d = tmp_path_factory.mktemp(f"{arch}-{outtype}-{who}")
            text = cache.get((arch, "text"))
            if text is None:
                text = cache[(arch, "text")] = d / "text.gguf"
                assert main(["convert-hf", str(model), "--outfile", str(text), "--outtype", "f32", "-q"]) == 0
            mm = d / f"mmproj-{outtype}.gguf"
            if who == "ours":
                assert main(["convert-hf", str(model), "--mmproj", "--outfile", str(mm), "--outtype", outtype,
                             "-q"]) == 0
            else:
                from helpers import llama_cpp_tree
                tree = llama_cpp_tree()
                if tree is None:
                    pytest.skip("llama.cpp source (llama-cpp-python sdist) could not be fetched from PyPI")
                r = run_reference_converter(tree, model, mm, outtype, "qwen2", "--mmproj")
                assert r.returncode == 0, r.stderr[-2000:]
            cache[key] = (model, text, mm)
        return cache[key]

    return build


@pytest.mark.parametrize("arch,deepstack", [("qwen3vl", 1), ("qwen35", 0)])
def test_image_embeddings_match_transformers_at_the_reference_level(converted, arch, deepstack):
    for outtype in ("f32", "f16"):
        model, text, ours = converted(arch, outtype)
        _, _, ref = converted(arch, outtype, "ref")
        mine, theirs = V.verify_vision(model, text, ours), V.verify_vision(model, text, ref)
        print(f"\n{arch} {outtype}: gguforge {mine.nmse:.3e}, llama.cpp converter {theirs.nmse:.3e}")
        for r in (mine, theirs):
            assert not r.problems and r.ok(), r.format()
            assert (r.n_tokens, r.n_embd, r.n_deepstack) == (24, 64 * (1 + deepstack), deepstack)
            assert [run.name for run in r.runs] == ["still", "2 frames"]
            for run in r.runs:
                assert [name for name, _ in run.parts] == ["merger"] + [f"deepstack {i + 1}" for i in range(deepstack)]
        # at the reference converter's level, and far below what a planted bug costs (~5e-2)
        assert mine.nmse <= 1.5 * theirs.nmse + 1e-9 and mine.nmse < 1e-6, (mine.nmse, theirs.nmse)


@pytest.mark.parametrize("arch,layout", [("qwen3vlmoe", "hub"), ("qwen35", "inner")])
def test_other_checkpoint_layouts(mock_model, tmp_path, arch, layout):
    """Published bf16 shards with packed experts, and the tower under model.language_model.visual.*:
    the vision tensors are found under either prefix on the HF side too."""
    from test_mmproj import relabel
    model = mock_model(arch, layout="hub")
    if layout == "inner":
        model = relabel(model, tmp_path / "inner" / model.name,
                        lambda k: k.replace("model.visual.", "model.language_model.visual."))
    text, mm = tmp_path / "text.gguf", tmp_path / "mm.gguf"
    assert main(["convert-hf", str(model), "--outfile", str(text), "--outtype", "f32", "-q"]) == 0
    assert main(["convert-hf", str(model), "--mmproj", "--outfile", str(mm), "--outtype", "f16", "-q"]) == 0
    r = V.verify_vision(model, text, mm)
    assert r.ok() and r.nmse < 1e-6 and not r.warnings, r.format()
    assert r.n_deepstack == (arch == "qwen3vlmoe")


def test_cli_reports_and_passes(converted, capsys):
    model, text, mm = converted("qwen3vl", "f16")
    capsys.readouterr()
    assert main(["verify", str(model), str(text), "--mmproj", str(mm)]) == 0
    out = capsys.readouterr().out
    assert "24 tokens x 128 (merger + 1 deepstack)" in out and "synthetic, 48x32 pixels" in out
    nmse = float(out.split("verify " + str(mm))[1].split("NMSE     :")[1].split()[0])
    assert 0 < nmse < 1e-6


def _plant(monkeypatch, bug: str) -> None:
    """A converter bug of the kind a real one would have."""
    from gguforge.archs import vision
    if bug == "image mean":
        original = vision.Qwen3VLVision.normalisation
        monkeypatch.setattr(vision.Qwen3VLVision, "normalisation",
                            lambda self, key: [0.5, 0.5, 0.5] if key == "image_mean" else original(self, key))
    elif bug == "transposed patch kernel":
        original_apply = vision.TimeStep.apply
        monkeypatch.setattr(vision.TimeStep, "apply", lambda self, x: original_apply(self, x).swap_last_axes())
    elif bug == "swapped temporal kernels":
        original_apply = vision.TimeStep.apply
        monkeypatch.setattr(vision.TimeStep, "apply", lambda self, x: original_apply(vision.TimeStep(1 - self.t), x))


@pytest.mark.parametrize("arch,bug", [("qwen35", "image mean"), ("qwen3vl", "transposed patch kernel"),
                                      ("qwen35", "swapped temporal kernels")])
def test_a_planted_converter_bug_fails_verify(converted, monkeypatch, tmp_path, capsys, arch, bug):
    model, text, good = converted(arch, "f32")
    _plant(monkeypatch, bug)
    bad = tmp_path / "bad.gguf"
    assert main(["convert-hf", str(model), "--mmproj", "--outfile", str(bad), "--outtype", "f32", "-q"]) == 0
    assert bad.read_bytes() != good.read_bytes()
    capsys.readouterr()
    assert main(["verify", str(model), str(text), "--mmproj", str(bad)]) == 1
    captured = capsys.readouterr()
    nmse = float(captured.out.split("verify " + str(bad))[1].split("NMSE     :")[1].split()[0])
    print(f"\n{arch} with a planted {bug}: NMSE {nmse:.3e}")
    assert nmse > 1e-2, captured.out
    failure = [line for line in captured.err.splitlines() if line.startswith("verify failed")]
    assert failure == [f"verify failed: image-embedding NMSE {nmse:.3e} is above --max-image-nmse 1.000e-03"]
    if bug == "swapped temporal kernels":  # a still image sees only the kernels' sum
        still = float(captured.out.split("still    : NMSE")[1].split()[0].rstrip(","))
        assert still < 1e-6, captured.out


def test_the_threshold_is_an_option(converted, capsys):
    """q8_0 (~1.5e-4) passes the default 1e-3 and fails a stricter bound."""
    model, text, _ = converted("qwen35", "f32")
    q8 = text.parent / "mmproj-q8_0.gguf"
    assert main(["convert-hf", str(model), "--mmproj", "--outfile", str(q8), "--outtype", "q8_0", "-q"]) == 0
    r = V.verify_vision(model, text, q8)
    assert 1e-5 < r.nmse < 1e-3 and r.ok()
    assert main(["verify", str(model), str(text), "--mmproj", str(q8), "--max-image-nmse", "1e-5"]) == 1
    assert "above --max-image-nmse 1.000e-05" in capsys.readouterr().err


def test_a_hub_download_brings_the_image_processor_config():
    """A hub id is fetched with HUB_PATTERNS: without the processor configs the mmproj would lack its
    image mean/std and verify would fall back to defaults (0.5s for real Qwen3.5 are not CLIP's)."""
    from fnmatch import fnmatch

    from gguforge.checkpoint.read import HUB_PATTERNS
    for name in ("preprocessor_config.json", "processor_config.json"):
        assert any(fnmatch(name, pattern) for pattern in HUB_PATTERNS), name


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def write_png(path: Path, img: np.ndarray, filters=(0, 1, 2, 3, 4)) -> Path:
    """An 8-bit RGB(A) PNG whose rows cycle through the five filter types (encoded here)."""
    h, w, ch = img.shape
    bpp, rows, prev = ch, [], np.zeros(w * ch, np.int32)
    for y in range(h):
        cur = img[y].reshape(-1).astype(np.int32)
        kind = filters[y % len(filters)]
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        corner = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        if kind == 0:
            pred = np.zeros_like(cur)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prev
        elif kind == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - corner
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - corner)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, corner))
        rows.append(bytes([kind]) + ((cur - pred) & 0xFF).astype(np.uint8).tobytes())
        prev = cur

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    colour = {3: 2, 4: 6}[ch]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    return path


def test_png_and_ppm_are_read_without_pillow(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "PIL", None)  # as on a machine without Pillow
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    assert np.array_equal(V.read_image(write_png(tmp_path / "a.png", img)), img)
    rgba = rng.integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    assert np.array_equal(V.read_image(write_png(tmp_path / "b.png", rgba)), rgba[:, :, :3])
    ppm = tmp_path / "c.ppm"
    ppm.write_bytes(b"P6\n# a comment\n9 7\n255\n" + img.tobytes())
    assert np.array_equal(V.read_image(ppm), img)


def test_an_image_file_of_any_size_is_brought_to_the_size_mtmd_keeps(converted, tmp_path, capsys):
    """50x37 is no multiple of 8: both sides get it resized to mtmd's own target (48x40, 30 tokens);
    had the target differed from mtmd's, mtmd would resize again and verify would say so."""
    model, text, mm = converted("qwen3vl", "f32")
    png = write_png(tmp_path / "photo.png", V.synthetic_image(50, 37)[::-1].copy())
    capsys.readouterr()
    assert main(["verify", str(model), str(text), "--mmproj", str(mm), "--image", str(png)]) == 0
    out = capsys.readouterr().out
    assert "(resized from 50x37), 48x40 pixels" in out and "30 tokens x 128" in out


@pytest.mark.parametrize("size,expected", [
    ((48, 32), (48, 32)),      # already aligned, within the budget: unchanged
    ((50, 37), (48, 40)),      # rounded to the nearest multiple (37/8 = 4.6 -> 5)
    ((52, 36), (56, 40)),      # halves round up, as C's std::round
    ((8, 8), (24, 24)),        # below 8 tokens: scaled up, then rounded up
    ((3, 70), (8, 72)),        # a side below one token becomes one token
    ((4000, 3000), (584, 440)),  # above 4096 tokens: scaled down, then rounded down
])
def test_target_size(size, expected):
    assert V.target_size(*size, align=8) == expected


def test_target_size_is_the_size_mtmd_resizes_to(converted):
    """mtmd's own token grid for raw images of awkward sizes (small ones: the encoder runs on them)."""
    _, text, mm = converted("qwen35", "f32")
    for w, h in [(50, 37), (52, 36), (8, 8), (3, 70), (61, 9)]:
        _, nx, ny = V.mtmd_image_embeddings(text, mm, V.synthetic_image(w, h))
        assert (nx * 8, ny * 8) == V.target_size(w, h, align=8), (w, h)


@pytest.mark.parametrize("n_frames", [1, 2])
def test_patches_follow_the_qwen2vl_layout(n_frames):
    """Row r of the patch matrix is patch (y, x) of the frames, [C, T, p, p] with slot t from frame t
    (a still image in both), patches ordered by merged token, then by position in the 2x2 merge square."""
    p, m, t = 4, 2, 2
    rng = np.random.default_rng(0)
    frames = [rng.standard_normal((16, 24, 3)).astype(np.float32) for _ in range(n_frames)]
    rows = V.qwen_vl_patches(frames, p, m, t)
    assert rows.shape == (4 * 6, 3 * t * p * p)
    r = 0
    for ty in range(2):
        for tx in range(3):
            for dy in range(m):
                for dx in range(m):
                    y, x = (ty * m + dy) * p, (tx * m + dx) * p
                    blocks = [f[y:y + p, x:x + p].transpose(2, 0, 1) for f in frames]  # [C, p, p] each
                    assert np.array_equal(rows[r].reshape(3, t, p, p), np.stack(blocks * (t // n_frames), axis=1))
                    r += 1


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any model loads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,words", [
    ("text gguf", "not a vision projector (mmproj) file (general.architecture is 'qwen3vl')"),
    ("missing mmproj", "--mmproj"),
    ("not a gguf", "not a GGUF file"),
    ("missing image", "--image"),
    ("bad image", "not a PPM (P6) or PNG image"),
    ("image without mmproj", "--image needs --mmproj"),
    ("no vision tower", "no vision_config"),
])
def test_bad_input_is_one_line_and_exit_2(converted, mock_model, tmp_path, capsys, monkeypatch, case, words):
    import sys
    monkeypatch.setitem(sys.modules, "PIL", None)
    model, text, mm = converted("qwen3vl", "f32")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, not an image or a GGUF\n")
    args = {
        "text gguf": [str(model), str(text), "--mmproj", str(text)],
        "missing mmproj": [str(model), str(text), "--mmproj", str(tmp_path / "nope.gguf")],
        "not a gguf": [str(model), str(text), "--mmproj", str(junk)],
        "missing image": [str(model), str(text), "--mmproj", str(mm), "--image", str(tmp_path / "nope.png")],
        "bad image": [str(model), str(text), "--mmproj", str(mm), "--image", str(junk)],
        "image without mmproj": [str(model), str(text), "--image", str(junk)],
        "no vision tower": [str(_without_vision(model, tmp_path)), str(text), "--mmproj", str(mm)],
    }[case]
    monkeypatch.setattr("gguforge.verify.verify", _must_not_run)  # rejected before anything loads
    capsys.readouterr()
    assert main(["verify", *args]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and words in lines[0], captured.err
    assert len(lines) <= 2 and not captured.out  # one error line (and a hint)


def _must_not_run(*args, **kwargs):
    raise AssertionError("models were loaded before the inputs were checked")


def _without_vision(model: Path, tmp_path: Path) -> Path:
    copy = shutil.copytree(model, tmp_path / "text-only")
    config = json.loads((copy / "config.json").read_text())
    del config["vision_config"]
    (copy / "config.json").write_text(json.dumps(config))
    return copy
