"""llama-quantize's further options (issue 13, item 3) against llama.cpp's own quantizer.

--override-kv, --prune-layers and --tensor-type-file reach llama_model_quantize through
llama-cpp-python (kv_overrides, prune_layers, tt_overrides of llama_model_quantize_params); numeric
ftype ids and the positional thread count are checked against the named preset. Whole files must be
byte-identical. Bad values: one line on stderr, exit 2, nothing written.
"""

from __future__ import annotations

import ctypes
import os

import gguf
import pytest
from gguf import GGMLQuantizationType as T

from gguforge.cli import main
from gguforge.quantize.rules import prune_and_renumber

from helpers import gguforge, llama_quantize

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("torch")  # the mocks are built with transformers


@pytest.fixture(scope="module", autouse=True)
def _quiet(quiet_llama):
    yield


@pytest.fixture(scope="module")
def dense(mock_model, tmp_path_factory):
    """A bf16 GGUF of a 5-layer qwen3 mock (q256 dimensions)."""
    src = mock_model("qwen3", dtype="bfloat16", size="q256", num_hidden_layers=5)
    out = tmp_path_factory.mktemp("opts-dense") / "dense-bf16.gguf"
    assert main(["convert-hf", str(src), "--outfile", str(out), "--outtype", "bf16", "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def moe(mock_model, tmp_path_factory):
    """A bf16 GGUF of a 4-layer, 8-expert qwen2moe mock (MoE FFN layers are read from the names)."""
    src = mock_model("qwen2moe", dtype="bfloat16", size="q256", num_experts=8, num_hidden_layers=4)
    out = tmp_path_factory.mktemp("opts-moe") / "moe-bf16.gguf"
    assert main(["convert-hf", str(src), "--outfile", str(out), "--outtype", "bf16", "-q"]) == 0
    return out


def kv_overrides(specs: list[str]):
    """llama_model_kv_override[] as llama-quantize's string_parse_kv_override builds it, terminated."""
    arr = (llama_cpp.llama_model_kv_override * (len(specs) + 1))()
    for o, spec in zip(arr, specs):
        key, _, rest = spec.partition("=")
        kind, _, value = rest.partition(":")
        o.key = key.encode()
        if kind == "int":
            o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, int(value)
        elif kind == "float":
            o.tag, o.value.val_f64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT, float(value)
        elif kind == "bool":
            o.tag, o.value.val_bool = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL, value == "true"
        else:
            o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()
    arr[len(specs)].key = b""
    return arr


def tt_overrides(pairs: list[tuple[str, T]]):
    arr = (llama_cpp.llama_model_tensor_override * (len(pairs) + 1))()
    for o, (pattern, qtype) in zip(arr, pairs):
        o.pattern, o.type = pattern.encode(), int(qtype)
    arr[len(pairs)].pattern, arr[len(pairs)].type = None, len(T) + 100  # terminator: pattern NULL
    return arr


def prune_list(layers: list[int]):
    return (ctypes.c_int32 * (len(layers) + 1))(*layers, -1)


def pointer(arr, ctype):
    return ctypes.cast(arr, ctypes.POINTER(ctype))


def assert_same_file(ours, theirs):
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    assert [(k, f.types, f.contents()) for k, f in a.fields.items()] == \
           [(k, f.types, f.contents()) for k, f in b.fields.items()]
    assert [(t.name, T(t.tensor_type)) for t in a.tensors] == [(t.name, T(t.tensor_type)) for t in b.tensors]
    same = ours.read_bytes() == theirs.read_bytes()
    assert same, "metadata and tensor types agree, yet the bytes differ"


# ---------------------------------------------------------------------------------------------
# Against llama-quantize


@pytest.mark.parametrize("specs", [
    ["general.name=str:Renamed model", "test.count=int:7", "test.scale=float:0.1", "test.flag=bool:true",
     "qwen3.context_length=int:4096", "general.file_type=int:2"],
    # the loader reads the overridden block count: the layer-position rules see 16 layers
    ["qwen3.block_count=int:16"],
], ids=["keys", "block_count"])
def test_override_kv_matches_llama_quantize(dense, specs, tmp_path):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    args = [a for s in specs for a in ("--override-kv", s)]
    assert main(["quantize", str(dense), str(ours), "Q4_K_M", "-q", *args]) == 0
    arr = kv_overrides(specs)
    llama_quantize(dense, theirs, "Q4_K_M", kv_overrides=pointer(arr, llama_cpp.llama_model_kv_override))
    assert_same_file(ours, theirs)
    fields = gguf.GGUFReader(ours).fields
    if "test.count" in fields:
        assert fields["test.count"].types == [gguf.GGUFValueType.UINT32]  # int overrides are UINT32
        assert fields["general.name"].contents() == "Renamed model"
        assert list(fields)[-6:] == [s.partition("=")[0] for s in specs]  # set in order, after file_type


def test_block_count_override_changes_the_rules(dense, tmp_path):
    """The override must reach the type rules, not only the metadata (else the test above proves little)."""
    plain, bumped = tmp_path / "plain.gguf", tmp_path / "bumped.gguf"
    assert main(["quantize", str(dense), str(plain), "Q4_K_M", "-q"]) == 0
    assert main(["quantize", str(dense), str(bumped), "Q4_K_M", "-q", "--override-kv", "qwen3.block_count=int:16"]) == 0
    types = [{t.name: T(t.tensor_type) for t in gguf.GGUFReader(p).tensors} for p in (plain, bumped)]
    assert types[0] != types[1]


@pytest.mark.parametrize("model,layers", [("dense", [1, 3]), ("dense", [0]), ("dense", [4]), ("moe", [2]),
                                          ("moe", [0, 1])])
def test_prune_layers_matches_llama_quantize(request, model, layers, tmp_path):
    src = request.getfixturevalue(model)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    assert main(["quantize", str(src), str(ours), "Q4_K_M", "-q", "--prune-layers", ",".join(map(str, layers))]) == 0
    arr = prune_list(layers)
    llama_quantize(src, theirs, "Q4_K_M", prune_layers=pointer(arr, ctypes.c_int32))
    assert_same_file(ours, theirs)
    reader = gguf.GGUFReader(ours)
    arch = reader.get_field("general.architecture").contents()
    n_before = gguf.GGUFReader(src).get_field(f"{arch}.block_count").contents()
    assert reader.get_field(f"{arch}.block_count").contents() == n_before - len(layers)
    blocks = {int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")}
    assert blocks == set(range(n_before - len(layers)))


def test_prune_renumbering():
    names = ["token_embd.weight", "blk.0.a", "blk.1.a", "blk.2.a", "blk.3.a", "blk.10.a", "v.blk.4.x"]
    new, count = prune_and_renumber(names, [1, 3])
    assert new == ["token_embd.weight", "blk.0.a", None, "blk.1.a", None, "blk.2.a", "v.blk.3.x"]
    assert count == 4


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_tensor_type_file_matches_llama_quantize(request, model, tmp_path):
    src = request.getfixturevalue(model)
    pairs = [("attn_v", T.Q8_0), ("ffn_down", T.Q5_K), ("blk\\.1\\..*", T.Q4_0), ("ffn", T.Q6_K)]
    listing = tmp_path / "types.txt"
    listing.write_text("attn_v=Q8_0\n  ffn_down=q5_k blk\\.1\\..*=q4_0\n\nFFN=q6_k\n")  # patterns are lower-cased
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama.gguf"
    assert main(["quantize", str(src), str(ours), "Q4_K_M", "-q", "--tensor-type-file", str(listing)]) == 0
    arr = tt_overrides(pairs)
    llama_quantize(src, theirs, "Q4_K_M", tt_overrides=pointer(arr, llama_cpp.llama_model_tensor_override))
    assert_same_file(ours, theirs)


def test_tensor_type_file_and_option_keep_command_line_order(dense, tmp_path):
    """The first matching pattern wins, so --tensor-type and --tensor-type-file entries keep their order."""
    listing = tmp_path / "types.txt"
    listing.write_text("ffn_down=q8_0\n")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    first, second = ["--tensor-type", "ffn_down=q5_0"], ["--tensor-type-file", str(listing)]
    assert main(["quantize", str(dense), str(a), "Q4_K_M", "-q", *first, *second]) == 0
    assert main(["quantize", str(dense), str(b), "Q4_K_M", "-q", *second, *first]) == 0
    for path, want in ((a, T.Q5_0), (b, T.Q8_0)):
        got = {T(t.tensor_type) for t in gguf.GGUFReader(path).tensors if "ffn_down" in t.name}
        assert got == {want}


def test_numeric_ftype_and_positional_threads(dense, tmp_path):
    named, numeric, threaded = tmp_path / "named.gguf", tmp_path / "numeric.gguf", tmp_path / "threaded.gguf"
    assert main(["quantize", str(dense), str(named), "Q4_K_M", "-q"]) == 0
    assert main(["quantize", str(dense), str(numeric), "15", "-q"]) == 0  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert main(["quantize", str(dense), str(threaded), "q4_k_m", "1", "-q"]) == 0
    assert named.read_bytes() == numeric.read_bytes() == threaded.read_bytes()
    q8 = tmp_path / "q8.gguf"
    assert main(["quantize", str(dense), str(q8), "7", "3", "-q"]) == 0  # LLAMA_FTYPE_MOSTLY_Q8_0, 3 threads
    assert gguf.GGUFReader(q8).get_field("general.file_type").contents() == 7


# ---------------------------------------------------------------------------------------------
# Bad values


@pytest.mark.parametrize("args,message", [
    (["--override-kv", "general.name"], "no '='"),
    (["--override-kv", "general.name=text:x"], "unknown type"),
    (["--override-kv", "general.name=x"], "no TYPE"),
    (["--override-kv", "=str:x"], "key is empty"),
    (["--override-kv", "k=int:1.5"], "not a whole number"),
    (["--override-kv", "k=int:-1"], "does not fit"),
    (["--override-kv", "k=int:4294967296"], "does not fit"),
    (["--override-kv", "k=float:abc"], "not a number"),
    (["--override-kv", "k=float:1e39"], "not a finite FLOAT32"),
    (["--override-kv", "k=bool:yes"], "not true or false"),
    (["--override-kv", "k=str:" + "x" * 128], "longer than 127 bytes"),
    (["--override-kv", "k" * 128 + "=int:1"], "longer than 127 bytes"),
    (["--override-kv", "split.count=int:2"], "split options"),
    (["--override-kv", "qwen3.block_count=str:5"], "must be int"),
    (["--prune-layers", "1,x"], "not a block number"),
    (["--prune-layers", "-1"], "not a block number"),
    (["--prune-layers", ""], "not a block number"),
    (["--prune-layers", "9"], "does not exist"),
    (["--prune-layers", "0,1,2,3,4"], "removes every block"),
    (["--tensor-type-file", "MISSING"], "No such file"),
    (["--tensor-type-file", "BAD"], "malformed --tensor-type"),
    (["--tensor-type-file", "BADTYPE"], "unknown ggml type"),
    (["NTHREADS=x"], "not a whole number"),
    (["NTHREADS=2", "--threads", "3"], "disagree"),
    (["TYPE=99"], "unknown quantization type"),
])
def test_bad_values_are_one_line_and_exit_2(dense, tmp_path, args, message):
    (tmp_path / "BAD").write_text("attn_v=q8_0 attn_k\n")
    (tmp_path / "BADTYPE").write_text("attn_v=q9_9\n")
    qtype, extra = "Q4_K_M", []
    for a in args:
        if a.startswith("TYPE="):
            qtype = a.partition("=")[2]
        elif a.startswith("NTHREADS="):
            extra.insert(0, a.partition("=")[2])
        else:
            extra.append(str(tmp_path / a) if a in ("MISSING", "BAD", "BADTYPE") else a)
    out = tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    r = gguforge("quantize", str(dense), str(out), qtype, *extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and message in lines[0], r.stderr
    assert len([line for line in lines if not line.startswith("hint:")]) == 1, r.stderr
    assert os.listdir(out.parent) == []
