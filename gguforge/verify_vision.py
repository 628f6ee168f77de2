"""Check an mmproj GGUF against its Hugging Face vision tower: image embeddings as NMSE.

`gguforge verify MODEL FILE.gguf --mmproj MMPROJ.gguf` runs one image through llama.cpp's mtmd (the
text GGUF plus the mmproj, through llama-cpp-python's ctypes binding of libmtmd) and through the
checkpoint's vision model in transformers (float32), and compares the two sets of image embeddings.

Both sides see the same pixels: the image is first brought to a size mtmd keeps as it is (sides that
are multiples of patch_size x spatial_merge_size, a token count inside mtmd's limits), so mtmd's own
resize is a plain copy (tools/mtmd/mtmd-image.cpp, img_tool::resize); each side then normalises the
8-bit pixels with its own mean/std: mtmd with the mmproj's clip.vision.image_mean/std, transformers with
the checkpoint's image-processor config, so a wrong mean or std in the mmproj shows up as a difference.

The image is compared twice: as a still image (what users send; transformers repeats it over the
two temporal slots of each patch, mtmd applies both temporal patch kernels to it and adds the results)
and as two different video frames (mtmd joins two bitmaps marked mergeable into one input; each frame
meets one kernel). Only the second shows the two kernels separately: a still sees just their sum.

What mtmd returns for the Qwen3-VL family (projector "qwen3vl_merger", tools/mtmd/models/qwen3vl.cpp):
one row per merged token, in raster order of the merged grid, holding the merger's output followed by
each deepstack merger's output (ViT layer order) along the feature axis. transformers' vision model
returns the same pieces separately (pooler_output and deepstack_features); they are concatenated in
that order here and compared part by part as well. Qwen2-VL and Qwen2.5-VL ("qwen2vl_merger",
"qwen2.5vl_merger", tools/mtmd/models/qwen2vl.cpp) have no deepstack: the rows are the merger's output.

numpy only at import time; torch, transformers and llama_cpp are imported inside functions.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError, not_a_file

# mtmd's token limits for the Qwen-VL projectors (clip.cpp, clip_model_loader::load_hparams:
# set_limit_image_tokens(8, 4096)); they are passed explicitly too, so the two always agree.
MIN_IMAGE_TOKENS, MAX_IMAGE_TOKENS = 8, 4096
# Merged tokens of the default synthetic image: a 6 x 4 grid (not square, so a swapped x/y shows).
DEFAULT_GRID = (6, 4)
# Above this NMSE the image embeddings are taken to differ: an f32/f16 mmproj is at ~1e-7 on the mocks,
# a q8_0 one at ~1.5e-4; a wrong image mean alone costs ~5e-2.
DEFAULT_MAX_IMAGE_NMSE = 1e-3
PROJECTORS = ("qwen3vl_merger", "qwen2vl_merger", "qwen2.5vl_merger")  # the vision encoders gguforge writes
LLAMA_FLASH_ATTN_TYPE_DISABLED = 0  # llama.h enum llama_flash_attn_type: f16 K/V would add ~1e-7 of noise


@dataclass
class VisionFacts:
    """What an mmproj file says about its encoder (the clip.* keys mtmd reads)."""

    path: Path
    projector: str
    patch_size: int
    merge_size: int
    projection_dim: int
    n_deepstack: int
    image_mean: list[float]
    image_std: list[float]

    @property
    def align(self) -> int:
        """Side of one merged token in pixels: image sides must be multiples of it."""
        return self.patch_size * self.merge_size

    @property
    def width(self) -> int:
        """Columns of one embedding row: the merger's output plus one block per deepstack merger."""
        return self.projection_dim * (1 + self.n_deepstack)


@dataclass
class Run:
    """One input compared: its NMSE overall and per output block (merger, deepstack mergers)."""

    name: str
    nmse: float
    nmse_db: float
    max_abs_diff: float
    parts: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class VisionReport:
    mmproj_path: str
    image: str  # where the pixels came from
    width: int = 0  # pixels seen by both sides
    height: int = 0
    n_tokens: int = 0
    n_embd: int = 0  # columns compared
    n_deepstack: int = 0
    runs: list[Run] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why the two outputs cannot be compared
    warnings: list[str] = field(default_factory=list)

    @property
    def nmse(self) -> float:
        """The worst run's NMSE (what the threshold applies to)."""
        return max((r.nmse for r in self.runs), default=float("nan"))

    def ok(self, max_nmse: float = DEFAULT_MAX_IMAGE_NMSE) -> bool:
        return not self.problems and bool(self.runs) and self.nmse <= max_nmse

    def format(self) -> str:
        lines = [f"verify {self.mmproj_path}",
                 f"  image    : {self.image}, {self.width}x{self.height} pixels"]
        lines += [f"  MISMATCH : {p}" for p in self.problems]
        if self.runs:
            deep = f" (merger + {self.n_deepstack} deepstack)" if self.n_deepstack else ""
            lines.append(f"  embedding: {self.n_tokens} tokens x {self.n_embd}{deep}")
            worst = max(self.runs, key=lambda r: r.nmse)
            lines.append(f"  NMSE     : {worst.nmse:.3e} ({worst.nmse_db:.1f} dB)")
            for r in self.runs:
                parts = (" (" + ", ".join(f"{n} {v:.3e}" for n, v in r.parts) + ")") if len(r.parts) > 1 else ""
                lines.append(f"  {r.name:<9}: NMSE {r.nmse:.3e}{parts}, max |Δ| {r.max_abs_diff:.3e}")
        lines += [f"  warning  : {w}" for w in self.warnings]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The mmproj's facts
# ------------------------------------------------------------------------------------------------


def read_mmproj(path) -> VisionFacts:
    """The clip.* facts of an mmproj file; one UserError line when it is not one verify can check."""
    from .format.reader import open_reader

    path = Path(path)
    try:
        reader = open_reader(path)  # (no such file, not a GGUF, truncated ...)
    except UserError as e:
        raise UserError(f"--mmproj {e.message}", e.hint) from None

    def kv(key):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    arch = kv("general.architecture")
    if arch != "clip" or not kv("clip.has_vision_encoder"):
        what = f"general.architecture is {arch!r}" if arch != "clip" else "it has no vision encoder"
        raise UserError(f"--mmproj {path}: not a vision projector (mmproj) file ({what})",
                        hint="give the file `convert-hf MODEL --mmproj` wrote")
    projector = kv("clip.projector_type") or kv("clip.vision.projector_type")
    if projector not in PROJECTORS:
        raise UserError(f"--mmproj {path}: projector {projector!r} is not one verify knows "
                        f"({', '.join(PROJECTORS)})")

    def positive(key, default=None):
        value = kv(key)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"--mmproj {path}: {key} must be a positive integer, got {value!r}")
        return value

    def floats(key):
        value = kv(key)
        if not isinstance(value, list) or len(value) != 3 or not all(
                isinstance(v, float) and math.isfinite(v) for v in value):
            raise UserError(f"--mmproj {path}: {key} must hold three numbers, got {value!r}")
        return value

    deepstack = kv("clip.vision.is_deepstack_layers") or []
    return VisionFacts(path, projector, positive("clip.vision.patch_size"),
                       positive("clip.vision.spatial_merge_size", default=2),
                       positive("clip.vision.projection_dim"), sum(bool(d) for d in deepstack),
                       floats("clip.vision.image_mean"), floats("clip.vision.image_std"))


# ------------------------------------------------------------------------------------------------
# Pixels (numpy only)
# ------------------------------------------------------------------------------------------------


def synthetic_image(width: int, height: int) -> np.ndarray:
    """A deterministic RGB test image [height, width, 3] uint8: a horizontal ramp in red, a vertical one
    in green, and in blue a diagonal stripe pattern over a checkerboard, so every axis and channel
    carries structure and no two tokens look alike."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    r = x * 255 // max(width - 1, 1)
    g = y * 255 // max(height - 1, 1)
    b = (((x + 2 * y) * 37) % 160) + 80 * (((x // 3) + (y // 5)) % 2)
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def target_size(width: int, height: int, align: int, min_tokens: int = MIN_IMAGE_TOKENS,
                max_tokens: int = MAX_IMAGE_TOKENS) -> tuple[int, int]:
    """(width, height) mtmd brings an image to for the Qwen-VL projectors: each side rounded to a
    multiple of `align`, then scaled (keeping the aspect ratio) into the pixel budget. The rule of
    tools/mtmd/mtmd-image.cpp img_tool::calc_size_preserved_ratio, in float32 as there (std::round
    rounds halves away from zero); an image already of this size is passed through unchanged."""
    f32 = np.float32
    fa = f32(align)
    min_pixels, max_pixels = min_tokens * align * align, max_tokens * align * align

    def by_factor(x, fn) -> int:
        return int(fn(f32(x) / fa)) * align

    def round_half_away(v):
        return np.floor(v + f32(0.5)) if v >= 0 else -np.floor(-v + f32(0.5))

    w, h = max(align, by_factor(width, round_half_away)), max(align, by_factor(height, round_half_away))
    if w * h > max_pixels:
        beta = np.sqrt(f32(height) * f32(width) / f32(max_pixels))
        h = max(align, by_factor(f32(height) / beta, np.floor))
        w = max(align, by_factor(f32(width) / beta, np.floor))
    elif w * h < min_pixels:
        beta = np.sqrt(f32(min_pixels) / (f32(height) * f32(width)))
        h = by_factor(f32(height) * beta, np.ceil)
        w = by_factor(f32(width) * beta, np.ceil)
    return w, h


def resize_bilinear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """`img` [H, W, 3] uint8 resampled to [height, width, 3] (bilinear, pixel centres aligned). Both
    sides of the comparison get the result, so any sensible resampling will do."""
    h0, w0 = img.shape[:2]
    if (h0, w0) == (height, width):
        return img
    ys = np.clip((np.arange(height) + 0.5) * h0 / height - 0.5, 0, h0 - 1)
    xs = np.clip((np.arange(width) + 0.5) * w0 / width - 0.5, 0, w0 - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h0 - 1), np.minimum(x0 + 1, w0 - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    a = img.astype(np.float64)
    top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
    bottom = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
    return np.clip(np.rint(top * (1 - fy) + bottom * fy), 0, 255).astype(np.uint8)


def read_image(path) -> np.ndarray:
    """An image file as RGB [H, W, 3] uint8: with Pillow when it is installed, otherwise binary PPM
    (P6) and 8-bit PNG are read here. Alpha is dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--image {not_a_file(path).message}")
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except (OSError, ValueError) as e:
            raise UserError(f"--image {path}: cannot read the image ({e})") from None
    data = path.read_bytes()
    try:
        if data.startswith(b"P6"):
            return _read_ppm(data)
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            return _read_png(data)
    except (ValueError, struct.error, zlib.error) as e:
        raise UserError(f"--image {path}: cannot read the image ({e})") from None
    raise UserError(f"--image {path}: not a PPM (P6) or PNG image",
                    hint="install Pillow (pip install pillow) to read other formats")


def _read_ppm(data: bytes) -> np.ndarray:
    """Binary PPM: 'P6', width, height, maxval (whitespace separated, '#' comments), one whitespace
    byte, then the samples."""
    fields, pos = [], 2
    while len(fields) < 3:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        start = pos
        while pos < len(data) and data[pos:pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise ValueError("malformed PPM header")
        fields.append(int(data[start:pos]))
    width, height, maxval = fields
    if not (0 < width and 0 < height and 0 < maxval < 256):
        raise ValueError(f"unsupported PPM ({width}x{height}, maxval {maxval}; only 8-bit)")
    pixels = np.frombuffer(data, dtype=np.uint8, count=width * height * 3, offset=pos + 1)
    img = pixels.reshape(height, width, 3)
    return img if maxval == 255 else (img.astype(np.uint32) * 255 // maxval).astype(np.uint8)


PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (no palettes)


def _read_png(data: bytes) -> np.ndarray:
    """A non-interlaced 8-bit greyscale/RGB PNG, with or without alpha (PNG spec: IHDR, IDAT, the five
    row filters)."""
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise ValueError("no IHDR chunk")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in PNG_CHANNELS or interlace:
        raise ValueError(f"unsupported PNG (bit depth {depth}, colour type {colour}, interlace {interlace}); "
                         "install Pillow for these")
    ch = PNG_CHANNELS[colour]
    stride = width * ch
    raw = zlib.decompress(b"".join(idat))
    if len(raw) != height * (stride + 1):
        raise ValueError("image data has the wrong size")
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for row in range(height):
        kind = raw[row * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=row * (stride + 1) + 1).astype(np.int32)
        cur = _unfilter(kind, line, prev, ch)
        out[row] = cur
        prev = cur
    img = out.reshape(height, width, ch)
    if ch <= 2:
        return np.repeat(img[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _unfilter(kind: int, line: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    if kind == 0:
        return line
    if kind == 2:  # Up
        return (line + prev) & 0xFF
    cur = line.copy()
    for i in range(len(cur)):  # Sub, Average, Paeth depend on the reconstructed left neighbour
        left = cur[i - bpp] if i >= bpp else 0
        up, corner = prev[i], (prev[i - bpp] if i >= bpp else 0)
        if kind == 1:
            pred = left
        elif kind == 3:
            pred = (left + up) // 2
        elif kind == 4:
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            pred = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
        else:
            raise ValueError(f"unknown PNG row filter {kind}")
        cur[i] = (cur[i] + pred) & 0xFF
    return cur


def normalise(img: np.ndarray, mean, std, rescale: float | None = 1 / 255, normalize: bool = True) -> np.ndarray:
    """[H, W, 3] uint8 -> float32 (x * rescale - mean) / std per channel, as an image processor does
    with do_rescale (rescale None: off) and do_normalize."""
    x = img.astype(np.float32)
    if rescale is not None:
        x = x / np.float32(255) if rescale == 1 / 255 else x * np.float32(rescale)
    if normalize:
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x


def qwen_vl_patches(frames: list[np.ndarray], patch: int, merge: int, temporal: int) -> np.ndarray:
    """Normalised frames ([H, W, C] each: one still image, or `temporal` video frames) in the Qwen2-VL
    image processor's patch layout: one row per patch, patches ordered by merged token (raster order)
    then by position inside the merge square, each row [C, temporal, patch, patch], slot t holding
    frame t (a still image fills every slot). transformers: Qwen2VLImageProcessor's patchify for images,
    Qwen2VLVideoProcessor for frames."""
    if len(frames) == 1:
        frames = list(frames) * temporal
    if len(frames) != temporal:
        raise ValueError(f"{len(frames)} frames for a temporal patch of {temporal}")
    h, w, c = frames[0].shape
    gh, gw = h // patch, w // patch
    a = np.stack([f.transpose(2, 0, 1) for f in frames])  # [T, C, H, W]
    a = a.reshape(temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    a = a.transpose(2, 5, 3, 6, 1, 0, 4, 7)  # [gh/m, gw/m, m, m, C, T, p, p]
    return np.ascontiguousarray(a.reshape(gh * gw, c * temporal * patch * patch))


def compare(gguf, hf) -> dict:
    """NMSE = Σ(a−b)² / Σb² with b the reference, its dB, and the largest absolute difference."""
    a, b = np.asarray(gguf, np.float64), np.asarray(hf, np.float64)
    err, ref = float(np.sum((a - b) ** 2)), float(np.sum(b ** 2))
    nmse = err / ref if ref > 0 else (0.0 if err == 0 else math.inf)
    return {"nmse": nmse, "nmse_db": 10 * math.log10(nmse) if nmse > 0 else -math.inf,
            "max_abs_diff": float(np.max(np.abs(a - b))) if a.size else 0.0}


# ------------------------------------------------------------------------------------------------
# The Hugging Face side
# ------------------------------------------------------------------------------------------------


def hf_preprocessing(hf_dir) -> tuple[dict, list[str]]:
    """(normalise() keyword arguments, warnings) as transformers' image processor of the checkpoint
    has them: processor_config.json's "image_processor" when present, else preprocessor_config.json
    (transformers: ImageProcessingMixin.get_image_processor_dict); a value missing there is the
    Qwen2-VL image processor's default (OpenAI CLIP's mean/std, rescale by 1/255, normalise)."""
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    try:
        config, _ = ImageProcessingMixin.get_image_processor_dict(str(hf_dir))
    except (OSError, ValueError):
        config = {}
    warnings, out = [], {}
    for key, default in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
        value = config.get(key)
        if value is None:
            warnings.append(f"the checkpoint's image processor names no {key}: using {list(default)}")
            value = default
        if isinstance(value, (int, float)):
            value = [value] * 3
        out[key[len("image_"):]] = [float(v) for v in value]
    out["rescale"] = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None
    out["normalize"] = bool(config.get("do_normalize", True))
    return out, warnings


def load_hf_vision(hf_dir):
    """(vision model in float32, its config, warnings): the checkpoint's vision tower alone, built from
    vision_config with the class its ConditionalGeneration model uses, and only the visual tensors
    read (bounded memory for large checkpoints)."""
    import torch
    import transformers

    from .checkpoint.read import open_checkpoint

    config = transformers.AutoConfig.from_pretrained(str(hf_dir))
    if getattr(config, "vision_config", None) is None:
        raise UserError(f"{hf_dir}: config.json has no vision_config: the checkpoint has no vision tower "
                        "to check --mmproj against")
    names = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        raise UserError(f"{hf_dir}: transformers has no class {names[0] if names else '(none named)'} "
                        "to build the vision tower with")
    with torch.device("meta"):
        shell = cls(config)
    inner = getattr(shell, "model", shell)
    visual = getattr(inner, "visual", None)
    if visual is None:
        visual = getattr(getattr(inner, "language_model", None), "visual", None)
    if visual is None:
        raise UserError(f"{hf_dir}: {cls.__name__} has no vision tower")
    model = type(visual)(config.vision_config).float().eval()

    from .archs.vision import VISUAL_PREFIXES
    state = {}
    for name, t in open_checkpoint(Path(hf_dir)).tensors.items():
        prefix = next((p for p in VISUAL_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            rows = t.rows(0, t.shape[0]) if t.shape else t.rows(0, 1)
            state[name[len(prefix):]] = torch.from_numpy(np.asarray(rows, np.float32).reshape(t.shape))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise UserError(f"{hf_dir}: the checkpoint lacks {len(result.missing_keys)} vision tensors, "
                        f"e.g. {result.missing_keys[0]}")
    warnings = []
    if result.unexpected_keys:
        warnings.append(f"{len(result.unexpected_keys)} visual tensors unused by {type(model).__name__}, "
                        f"e.g. {result.unexpected_keys[0]}")
    return model, config.vision_config, warnings


def hf_image_embeddings(model, vision_config, frames: list[np.ndarray]) -> list[np.ndarray]:
    """[merger output, deepstack outputs...] ([tokens, width] each) for normalised frames [H, W, 3]
    (one still image, or two video frames filling the two temporal slots of each patch)."""
    import torch

    p, m = vision_config.patch_size, vision_config.spatial_merge_size
    t = getattr(vision_config, "temporal_patch_size", 2)
    patches = torch.from_numpy(qwen_vl_patches(frames, p, m, t))
    h, w = frames[0].shape[:2]
    with torch.no_grad():
        out = model(patches, grid_thw=torch.tensor([[1, h // p, w // p]]))
    if isinstance(out, tuple):  # transformers 4.x: (merged, deepstack list)
        main, deep = out[0], (out[1] if len(out) > 1 else [])
    else:
        main, deep = out.pooler_output, getattr(out, "deepstack_features", None) or []
    return [x.float().numpy() for x in (main, *deep)]


# ------------------------------------------------------------------------------------------------
# The llama.cpp side
# ------------------------------------------------------------------------------------------------


class Mtmd:
    """The text GGUF and the mmproj loaded in llama.cpp's mtmd (flash attention off: it casts K/V to
    f16; token limits pinned to MIN/MAX_IMAGE_TOKENS). mtmd's log is collected while it is open and
    its last error line is raised on failure. Use as a context manager."""

    def __init__(self, text_gguf, mmproj, n_threads: int = 2):
        self.text_gguf, self.mmproj, self.n_threads = str(text_gguf), str(mmproj), n_threads
        self.model = self.ctx = None
        self.log: list[str] = []

    def __enter__(self) -> "Mtmd":
        import ctypes

        import llama_cpp
        from llama_cpp import mtmd_cpp as mtmd

        @llama_cpp.llama_log_callback
        def collect(level, text, data):
            self.log.append(text.decode("utf-8", "replace"))

        self._collect = collect  # (kept alive while llama.cpp holds it)
        llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        mtmd.mtmd_log_set(collect, ctypes.c_void_p(0))
        try:
            params = llama_cpp.llama_model_default_params()
            params.n_gpu_layers = 0
            self.model = llama_cpp.llama_model_load_from_file(self.text_gguf.encode(), params)
            if not self.model:
                raise self.failure(f"cannot load the text model {self.text_gguf}")
            p = mtmd.mtmd_context_params_default()
            p.use_gpu, p.n_threads, p.warmup = False, self.n_threads, False
            p.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED
            p.image_min_tokens, p.image_max_tokens = MIN_IMAGE_TOKENS, MAX_IMAGE_TOKENS
            self.ctx = mtmd.mtmd_init_from_file(self.mmproj.encode(), self.model, p)
            if not self.ctx:
                raise self.failure(f"cannot load {self.mmproj} with the text model {self.text_gguf}")
            if not mtmd.mtmd_support_vision(self.ctx):
                raise self.failure(f"{self.mmproj} has no vision encoder")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        import ctypes

        import llama_cpp
        from llama_cpp import mtmd_cpp as mtmd
        from llama_cpp._logger import llama_log_callback as default_log

        if self.ctx:
            mtmd.mtmd_free(self.ctx)
        if self.model:
            llama_cpp.llama_model_free(self.model)
        self.ctx = self.model = None
        mtmd.mtmd_log_set(default_log, ctypes.c_void_p(0))
        llama_cpp.llama_log_set(default_log, ctypes.c_void_p(0))

    def failure(self, what: str) -> UserError:
        lines = [s.strip() for s in "".join(self.log).splitlines() if s.strip()]
        why = next((s for s in reversed(lines) if "error" in s.lower() or "mismatch" in s.lower()), None)
        return UserError(f"mtmd: {what}" + (f": {why}" if why else ""))

    def encode(self, frames: list[np.ndarray]) -> tuple[np.ndarray, int, int]:
        """(embeddings [tokens, width], merged tokens across, merged tokens down) of one still image
        ([H, W, 3] uint8), or of two video frames: bitmaps marked mergeable, which mtmd joins into
        one input whose frames meet the two temporal patch kernels (mtmd.cpp,
        mtmd_group_mergeable_bitmaps; models/qwen2vl.cpp, build_inp_with_temporal_merge)."""
        import ctypes

        import llama_cpp
        from llama_cpp import mtmd_cpp as mtmd

        bitmaps, chunks = [], None
        try:
            data = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
            for d in data:
                bitmap = mtmd.mtmd_bitmap_init(d.shape[1], d.shape[0], d.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
                bitmaps.append(bitmap)
                if len(frames) > 1:
                    mtmd.mtmd_bitmap_set_mergeable(bitmap, True)
            chunks = mtmd.mtmd_input_chunks_init()
            markers = mtmd.mtmd_default_marker() * len(frames)
            text = mtmd.mtmd_input_text(markers, len(markers), False, True)
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            if mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), array, len(bitmaps)) != 0:
                raise self.failure("tokenizing the image failed")
            found = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
            found = [c for c in found if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            if len(found) != 1:
                raise self.failure(f"{len(frames)} frame(s) gave {len(found)} image inputs, not one")
            chunk = found[0]
            tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
            nx, ny = mtmd.mtmd_image_tokens_get_nx(tokens), mtmd.mtmd_image_tokens_get_ny(tokens)
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd.mtmd_encode_chunk(self.ctx, chunk) != 0:
                raise self.failure("encoding the image failed")
            width = llama_cpp.llama_model_n_embd_inp(self.model)  # mtmd's rows are as wide as the text input
            out = mtmd.mtmd_get_output_embd(self.ctx)
            return np.ctypeslib.as_array(out, shape=(n * width,)).reshape(n, width).copy(), nx, ny
        finally:
            if chunks:
                mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                if bitmap:
                    mtmd.mtmd_bitmap_free(bitmap)


def mtmd_image_embeddings(text_gguf, mmproj, img: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Mtmd(...).encode([img]) for one still image."""
    with Mtmd(text_gguf, mmproj) as m:
        return m.encode([img])


# ------------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------------


def choose_image(facts: VisionFacts, image=None) -> tuple[np.ndarray, str]:
    """(pixels [H, W, 3] uint8 of a size mtmd keeps, description): the synthetic test image, or the
    image file resized to the size mtmd would resize it to."""
    if image is None:
        gx, gy = DEFAULT_GRID
        return synthetic_image(gx * facts.align, gy * facts.align), "synthetic"
    img = read_image(image)
    w, h = target_size(img.shape[1], img.shape[0], facts.align)
    note = f" (resized from {img.shape[1]}x{img.shape[0]})" if (w, h) != (img.shape[1], img.shape[0]) else ""
    return resize_bilinear(img, w, h), f"{image}{note}"


def second_frame(img: np.ndarray) -> np.ndarray:
    """The other video frame: the image upside down and inverted, unlike it everywhere (so each temporal
    patch kernel is seen on its own: a still image only ever shows their sum)."""
    return np.ascontiguousarray(255 - img[::-1])


def verify_vision(hf_dir, text_gguf, mmproj, *, image=None) -> VisionReport:
    """Compare mtmd's image embeddings (text GGUF + mmproj) with the HF vision tower's on one image,
    as a still and as two video frames (the image and second_frame of it)."""
    facts = read_mmproj(mmproj)
    img, label = choose_image(facts, image)
    report = VisionReport(str(mmproj), label, width=img.shape[1], height=img.shape[0])
    preprocessing, report.warnings = hf_preprocessing(hf_dir)
    model, vision_config, warnings = load_hf_vision(hf_dir)
    report.warnings += warnings
    align = vision_config.patch_size * vision_config.spatial_merge_size
    if align != facts.align:
        report.problems.append(f"patch x merge is {facts.align} pixels in the mmproj, {align} in the checkpoint")
        return report
    inputs = {"still": [img], "2 frames": [img, second_frame(img)]}
    with Mtmd(text_gguf, mmproj) as m:
        for name, frames in inputs.items():
            hf_parts = hf_image_embeddings(model, vision_config, [normalise(f, **preprocessing) for f in frames])
            gguf, nx, ny = m.encode(frames)
            if (nx * facts.align, ny * facts.align) != (img.shape[1], img.shape[0]):
                report.problems.append(f"mtmd resized the {img.shape[1]}x{img.shape[0]} image to a "
                                       f"{nx}x{ny} token grid")
            hf = np.concatenate(hf_parts, axis=-1)
            report.n_deepstack = len(hf_parts) - 1
            if gguf.shape != hf.shape:
                report.problems.append(f"mtmd gives {gguf.shape[0]} tokens x {gguf.shape[1]}, transformers "
                                       f"{hf.shape[0]} x {hf.shape[1]} (merger + {report.n_deepstack} deepstack)")
            if report.problems:
                return report
            report.n_tokens, report.n_embd = hf.shape
            total, parts, start = compare(gguf, hf), [], 0
            for i, part in enumerate(hf_parts):
                stop = start + part.shape[1]
                parts.append(("merger" if i == 0 else f"deepstack {i}", compare(gguf[:, start:stop], part)["nmse"]))
                start = stop
            report.runs.append(Run(name, total["nmse"], total["nmse_db"], total["max_abs_diff"], parts))
    return report
