"""Read step: a Hugging Face checkpoint opened lazily.

Only safetensors headers are parsed up front; tensor data is read (pread, in row
chunks) when a tensor is written, or handed to the kernel to copy as is. bf16 is
widened to float32 exactly (a 16-bit shift), so no torch is needed.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..format.types import FLOAT_TYPES
from ..quantize import native

# safetensors dtype -> (numpy storage dtype, bytes per element)
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened on read
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype("u1"),  # raw bits; quantized checkpoints (checkpoint/dequant.py) decode them
    "F8_E5M2": np.dtype("u1"),
}
FLOAT_DTYPES = tuple(t.name for t in FLOAT_TYPES)  # safetensors names of the GGUF float types
MAX_HEADER_BYTES = 100 * 1024 * 1024


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact: bf16 is the top half of a float32."""
    return native.bf16_to_f32(bits)


@dataclass
class SourceTensor:
    """One tensor inside a safetensors file: header facts plus lazy access to its bytes."""

    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute byte offset in the file
    end: int
    _shard: "Shard" = field(repr=False, default=None)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def compute_dtype(self) -> np.dtype:
        """dtype transforms run in: f16 and f32 stay, everything else (bf16) becomes f32, like the reference."""
        return np.dtype(np.float16) if self.dtype == "F16" else np.dtype(np.float32)

    def raw_rows(self, start: int, stop: int, buffer: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) along axis 0 in the stored dtype, read into `buffer` (uint8, reused by
        the caller to avoid page-faulting fresh memory for every chunk) or a new array."""
        storage = SAFETENSORS_DTYPES[self.dtype]
        row_elems = int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1
        count = (stop - start) * row_elems
        if buffer is None:
            out = np.empty(count, dtype=storage)
        else:
            out = buffer[:count * storage.itemsize].view(storage)
        self._shard.read_into(out, self.start + start * row_elems * storage.itemsize)
        if not self.shape:
            return out.reshape(())
        return out.reshape((stop - start,) + tuple(self.shape[1:]))

    def span(self, start: int, stop: int) -> tuple[int, int, int] | None:
        """(file descriptor, byte offset, byte count) of rows [start, stop), when they sit in a file
        that can be copied from directly (safetensors; not pickles)."""
        if not getattr(self._shard, "local", False):  # pickles and remote files are read, not copied
            return None
        row_bytes = self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes
        return self._shard.fileno(), self.start + start * row_bytes, (stop - start) * row_bytes

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) converted to the compute dtype."""
        if self.dtype not in FLOAT_DTYPES:
            raise UserError(f"tensor {self.name!r} has dtype {self.dtype}, which cannot be converted",
                            hint="only F32, F16 and BF16 weights are supported")
        raw = self.raw_rows(start, stop)
        if self.dtype == "BF16":
            return bf16_bits_to_f32(raw)
        return raw


def header_length(path, head: bytes, size: int) -> int:
    """The JSON header length a safetensors file starts with, checked against the file size."""
    if len(head) < 8:
        raise UserError(f"{path}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise UserError(f"{path}: safetensors header length {n} runs past the end of the "
                        f"file ({size} bytes); the file is truncated or not safetensors")
    return n


class Shard:
    """One safetensors file: parsed and validated header; data read with pread on demand.
    `read_into` is where a tensor's bytes come from (a remote file overrides it and `header_bytes`)."""

    local = True  # a file on disk: its byte ranges can be handed to the kernel to copy

    def __init__(self, path: Path):
        self.path = path
        self._fd = None
        self.tensors: dict[str, SourceTensor] = {}
        self._parse_header()

    def header_bytes(self) -> tuple[bytes, int]:
        """(the JSON header, the file size)."""
        path = self.path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = header_length(path, f.read(8), size)
                return f.read(n), size
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None

    def _parse_header(self) -> None:
        path = self.path
        raw, size = self.header_bytes()
        n = len(raw)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise UserError(f"{path}: safetensors header is not a JSON object")
        data_start = 8 + n
        data_size = size - data_start
        # by name, as safetensors lists them (and llama.cpp's converter reads them): the header itself
        # groups tensors of one dtype together, so a quantized checkpoint's header order is not the name order
        for name, info in sorted(header.items()):
            if name == "__metadata__":
                continue
            self.tensors[name] = self._tensor_from_header(name, info, data_start, data_size)
        self._check_no_overlap()

    def _check_no_overlap(self) -> None:
        """Each byte of data belongs to at most one tensor (overlaps would let one tensor's bytes pass
        for another's)."""
        spans = sorted((t.start, t.end, t.name) for t in self.tensors.values() if t.end > t.start)
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                raise UserError(f"{self.path.name}: the data of tensors {first!r} and {second!r} overlap",
                                hint="the safetensors file is corrupt or crafted")

    def _tensor_from_header(self, name, info, data_start, data_size) -> SourceTensor:
        where = f"{self.path.name}: tensor {name!r}"
        if not isinstance(info, dict):
            raise UserError(f"{where}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"{where}: unsupported dtype {dtype!r}",
                            hint="supported: " + ", ".join(SAFETENSORS_DTYPES))
        if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in shape)):
            raise UserError(f"{where}: invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise UserError(f"{where}: invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize  # exact: np.prod wraps around at 2**63
        if not 0 <= begin <= end:
            raise UserError(f"{where}: invalid data_offsets {offsets!r}")
        if end > data_size:
            raise UserError(f"{where}: data runs past the end of the file (ends at byte {end} of "
                            f"{data_size} data bytes); the file is truncated")
        if end - begin != expected:
            raise UserError(f"{where}: {end - begin} data bytes do not match dtype {dtype} and "
                            f"shape {shape} ({expected} bytes)")
        return SourceTensor(name, dtype, tuple(shape), self.path, data_start + begin, data_start + end, self)

    def fileno(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read_into(self, buffer: np.ndarray, offset: int) -> None:
        """Fill `buffer` from byte `offset`. pread instead of mmap: pages read for one chunk are not
        kept mapped, so resident memory stays at the chunks in flight, whatever the model size."""
        fd = self.fileno()
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise UserError(f"{self.path}: unexpected end of file (the file changed while converting?)")
            done += n

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


@dataclass
class Checkpoint:
    root: Path
    config: dict  # config.json as written
    tensors: dict[str, SourceTensor]  # in file order: shards sorted, names sorted within a shard
    quantization: object = None  # dequant.QuantSource when the weights were stored quantized

    @property
    def hparams(self) -> dict:
        """Top-level config with a nested text_config merged over it (wrapper checkpoints)."""
        text = text_config(self.config)
        return {**self.config, **text} if text else dict(self.config)

    def file(self, name: str) -> Path | None:
        p = self.root / name
        return p if p.is_file() else None


TEXT_CONFIG_KEYS = ("text_config", "llm_config", "lm_config", "language_config")


def text_config(config: dict) -> dict:
    for key in TEXT_CONFIG_KEYS:
        sub = config.get(key)
        if isinstance(sub, dict):
            return sub
    return {}


def read_json_object(path: Path, what: str | None = None) -> dict:
    """A JSON file that must hold an object; anything else is one clear error naming the file."""
    label = what or str(path)
    if Path(path).exists() and not Path(path).is_file():  # a FIFO would block, /dev/zero never end
        raise UserError(f"{label}: not a regular file")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{label}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{label}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{label}: expected a JSON object")
    return data


def load_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise UserError(f"{root}: no config.json found", hint="pass a Hugging Face model directory or hub id")
    return read_json_object(path)


def inside(root: Path, name, index_path: Path) -> Path:
    """A file an index names, which must lie inside the model directory: a relative path without '..',
    whose folder (after resolving symbolic links) is the model directory or below it. The file itself
    may be a symbolic link, as every file of a Hugging Face cache snapshot is (to ../../blobs/...)."""
    text = name if isinstance(name, str) else None
    parts = Path(text).parts if text and "\0" not in text else ()
    if not parts or Path(text).is_absolute() or ".." in parts:
        raise UserError(f"{index_path}: file name {name!r} is not inside the model directory",
                        hint="a checkpoint may only name files of its own; the index is corrupt or crafted")
    path = root / text
    folder = path.parent.resolve()
    if folder != root.resolve() and root.resolve() not in folder.parents:
        raise UserError(f"{index_path}: {text} lies in a folder outside the model directory (a symbolic link)",
                        hint="a checkpoint may only name files of its own")
    return path


def _index_shards(root: Path, listing: set[str] | None = None) -> list[tuple[Path, set[str] | None]]:
    """Safetensors files to read and, when an index exists, the names each must hold. `listing`: the
    files of a remote repository (whose small files alone are in `root`), instead of root's own."""
    def present(name: str) -> bool:
        return name in listing if listing is not None else (root / name).is_file()

    index_path = root / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index_path}: not a valid safetensors index (needs a 'weight_map' object)") from None
        by_file: dict[str, set[str]] = {}
        for name, fname in weight_map.items():
            inside(root, fname, index_path)
            by_file.setdefault(fname, set()).add(name)
        missing = [f for f in sorted(by_file) if not present(f)]
        if missing:
            raise UserError(f"{root}: shard {missing[0]} named in model.safetensors.index.json is missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                            hint="the download is incomplete; fetch the missing files")
        return [(root / f, by_file[f]) for f in sorted(by_file)]
    if present("model.safetensors"):
        return [(root / "model.safetensors", None)]
    if listing is not None:
        parts = sorted(root / f for f in listing if f.endswith(".safetensors") and "/" not in f)
        pickles = any(f.startswith("pytorch_model") and f.endswith(".bin") or f.endswith(".pt") for f in listing)
    else:
        parts = sorted(p for p in root.glob("*.safetensors") if p.is_file())
        pickles = any(root.glob("pytorch_model*.bin")) or any(root.glob("*.pt"))
    if parts:
        return [(p, None) for p in parts]
    if pickles:
        raise UserError(f"{root}: only pickle checkpoints (pytorch_model*.bin) found",
                        hint="pickle files can run arbitrary code; pass --allow-pickle to load their tensors "
                        "with torch (weights only), or convert them to safetensors first")
    raise UserError(f"{root}: no model.safetensors or safetensors shards found")


def open_checkpoint(root: Path, allow_pickle: bool = False) -> Checkpoint:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    config = load_config(root)
    if allow_pickle and not any(root.glob("*.safetensors")) and (pickles := pickle_files(root)):
        return dequantize(Checkpoint(root, config, load_pickled_tensors(pickles)))
    return dequantize(Checkpoint(root, config, shard_tensors((Shard(path), expected) for path, expected in _index_shards(root))))


def shard_tensors(shards) -> dict[str, SourceTensor]:
    """The tensors of (shard, names the index lists for it or None) pairs, checked against the index."""
    tensors: dict[str, SourceTensor] = {}
    for shard, expected in shards:
        path = shard.path
        names = shard.tensors
        if expected is not None:
            absent = sorted(expected - names.keys())
            if absent:
                raise UserError(f"{path.name}: tensor {absent[0]!r} is listed in model.safetensors.index.json "
                                f"but not stored in this shard"
                                + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""),
                                hint="the index and the shards disagree; re-download the checkpoint")
            extra = sorted(names.keys() - expected)
            if extra:
                raise UserError(f"{path.name}: tensor {extra[0]!r} is stored in this shard but the index "
                                f"does not list it here", hint="the index and the shards disagree")
        for name, t in names.items():
            if name in tensors:
                raise UserError(f"tensor {name!r} is stored twice ({tensors[name].path.name} and {path.name})")
            tensors[name] = t
    return tensors


def dequantize(checkpoint: Checkpoint) -> Checkpoint:
    """Quantized weights (quantization_config) read as float values: checkpoint/dequant.py."""
    from .dequant import dequantize as step
    return step(checkpoint)


# -- pickle checkpoints (only with --allow-pickle) ----------------------------------------------

TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def pickle_files(root: Path) -> list[Path]:
    """pytorch_model*.bin files: those named by pytorch_model.bin.index.json, else all of them."""
    index_path = root / "pytorch_model.bin.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            files = set(weight_map.values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index_path}: not a valid index (needs a 'weight_map' object)") from None
        names = sorted(f for f in files if inside(root, f, index_path))
        missing = [f for f in names if not (root / f).is_file()]
        if missing:
            raise UserError(f"{root}: {missing[0]} named in {index_path.name} is missing",
                            hint="the download is incomplete; fetch the missing files")
        return [root / f for f in names]
    return sorted(p for p in root.glob("pytorch_model*.bin") if p.is_file())


class PickledBytes:
    """read_into() over one tensor from torch.load(mmap=True): lets SourceTensor read it unchanged."""

    def __init__(self, tensor):
        self.tensor = tensor

    def read_into(self, buffer: np.ndarray, offset: int) -> None:
        import torch
        flat = self.tensor.contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy()  # bf16 has no numpy dtype: go through the bytes
        out = buffer.reshape(-1).view(np.uint8)
        out[:] = raw[offset:offset + out.size]


def load_pickled_tensors(paths: list[Path]) -> dict[str, SourceTensor]:
    """Tensors of pickle checkpoints, loaded by torch with weights_only=True (no code runs) and mmap."""
    try:
        import torch
    except ImportError:
        raise UserError("loading pickle checkpoints (--allow-pickle) needs torch, which is not installed",
                        hint="pip install torch (the CPU build is enough), or convert the checkpoint to "
                        "safetensors") from None
    tensors: dict[str, SourceTensor] = {}
    for path in paths:
        state = _torch_load(torch, path)
        if not isinstance(state, dict):
            raise UserError(f"{path}: expected a dictionary of tensors, found {type(state).__name__}")
        for name, t in state.items():
            if not isinstance(name, str) or not torch.is_tensor(t):
                raise UserError(f"{path}: entry {name!r} is not a tensor")
            if name in tensors:
                raise UserError(f"tensor {name!r} is stored twice ({tensors[name].path.name} and {path.name})")
            dtype = TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."), str(t.dtype))
            nbytes = t.numel() * t.element_size()
            tensors[name] = SourceTensor(name, dtype, tuple(t.shape), path, 0, nbytes, PickledBytes(t))
    return tensors


def _torch_load(torch, path: Path):
    import pickle
    import warnings
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: errors say enough
            warnings.simplefilter("ignore")
            return _torch_load_mmap(torch, path)
    except pickle.UnpicklingError as e:
        text = str(e).split("WeightsUnpickler error:")[-1]
        reason = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"{path}: refused by torch's weights-only loader ({reason})",
                        hint="the file is corrupt, or its pickle holds objects other than tensors, which "
                        "could run code when loaded") from None
    except Exception as e:  # torch.load reports corrupt files with many exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first})") from None


def _torch_load_mmap(torch, path: Path):
    try:
        return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, weights_only=True, map_location="cpu")  # legacy (pre-zip) format


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.*",
                "vocab.json", "merges.txt", "README.md",
                "preprocessor_config.json", "processor_config.json",  # image mean/std: --mmproj, verify --mmproj
                "tokenizer.model", "added_tokens.json",  # SentencePiece vocabularies (convert/spm.py)
                "hf_quant_config.json"]  # modelopt's quantization config (checkpoint/dequant.py)


def resolve_model(model: str, revision: str | None = None) -> Path:
    """A local directory, or a hub id fetched (only the files conversion needs) into the HF cache."""
    path = Path(model).expanduser()
    if path.exists() or not HUB_ID.match(model):
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a core dependency
        raise UserError(f"{model}: not a directory, and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS,
                                      token=os.environ.get("HF_TOKEN")))
    except RepositoryNotFoundError:
        raise UserError(f"{model}: no such model on the Hugging Face hub (or it is private)",
                        hint="set HF_TOKEN for private or gated models") from None
    except LocalEntryNotFoundError:
        raise UserError(f"{model}: not in the local Hugging Face cache and the hub cannot be reached",
                        hint="check the network, or unset HF_HUB_OFFLINE") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"{model}: download failed: {e}") from None
    except ValueError as e:  # HFValidationError: "Qwen/a..b" looks like an id but is not a valid one
        raise UserError(f"{model}: no such directory, and not a valid hub model id ({e})") from None
