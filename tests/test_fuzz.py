"""Property-based fuzzing of the loaders that read user files: bounded, derandomized, no deadline.

Every input either loads or fails with the project's own error (PipelineError, CalibError,
ExportError) whose message is one line. Any other exception is what a user would see as a
traceback, so it is a bug.
"""
import atexit
import gzip
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from edgerun.readers import ReaderError as CalibError  # read_idx raises ReaderError (tests moved to test_readers.py)
from edgerun.readers import _IDX_DTYPES, read_idx
from export.errors import ExportError
from export.onnx_export import check_onnx
from pipeline.config import Config, load_config
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WORK = Path(tempfile.mkdtemp(prefix="fuzz-"))  # hypothesis does not mix with function-scoped tmp_path
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text and "\r" not in text, f"message is not one line: {text!r}"
    return text


# ---------------------------------------------------------------- config loader

SECTIONS = {name: list(Config().section(name)) for name in Config.__dataclass_fields__}
VALUES = st.recursive(
    st.none().map(lambda _: "") | st.booleans() | st.integers(-2**63, 2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["cpu", "jetson-orin", "ratio", "l2", "fail", "warn", "int8", "mnist", "a/b", ".x"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


def toml_key(k: str) -> str:
    return json.dumps(k, ensure_ascii=False)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if not isinstance(v, float) or math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


@st.composite
def toml_documents(draw):
    """Mostly the real sections and keys (so the typed checks run), with some strangers."""
    lines = []
    for section in draw(st.lists(st.sampled_from(list(SECTIONS)) | st.text(min_size=1, max_size=6),
                                 max_size=4, unique=True)):
        lines.append(f"[{toml_key(section)}]")
        keys = SECTIONS.get(section, []) + ["ration", "x"]
        for key in draw(st.lists(st.sampled_from(keys) | st.text(min_size=1, max_size=6), max_size=4, unique=True)):
            lines.append(f"{toml_key(key)} = {toml_value(draw(VALUES))}")
    return "\n".join(lines) + "\n"


def load_or_pipeline_error(path, overrides=()):
    try:
        cfg = load_config(path, list(overrides))
    except PipelineError as e:
        one_line(e)
        return None
    assert isinstance(cfg, Config)
    return cfg


@FUZZ
@given(toml_documents())
@example("[prune]\nratio = nan\n")
@example('[run]\nname = "../x"\n')
@example("[data]\nsize = [28]\nmean = []\n")
@example("[profile]\nbatches = []\n")
@example("[[run]]\n")
def test_config_file_fuzz(text):
    path = WORK / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    load_or_pipeline_error(path)


@FUZZ
@given(st.binary(max_size=200) | st.text(alphabet=st.sampled_from('[]=".=,{}#\n abc1-_tf'), max_size=80))
def test_config_random_text_fuzz(data):
    path = WORK / "raw.toml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    load_or_pipeline_error(path)


OVERRIDE_KEYS = [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys]


@FUZZ
@given(st.lists(st.text(max_size=30)
                | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(OVERRIDE_KEYS + ["run", "x.y", "run.target.x", "a..b"]),
                            st.text(max_size=12) | VALUES.map(toml_value)), max_size=3))
@example(["run.target.x=1"])
@example(["prune.ratio=[1, 2"])
@example(["=1"])
@example(["run.seed=1\nname = 'x'"])
def test_config_override_fuzz(overrides):
    load_or_pipeline_error(ROOT / "configs/cpu.toml", overrides)


# ---------------------------------------------------------------- IDX reader

def expected_idx(raw: bytes):
    """What read_idx must return for these bytes: (shape, dtype), or None for an error."""
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        return None
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        return None
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) - header != math.prod(shape) * dtype.itemsize:  # Python ints: no overflow
        return None
    return shape, dtype


def check_idx(raw: bytes, stored: bytes, suffix: str):
    path = WORK / f"fuzz{suffix}"
    path.write_bytes(stored)
    want = expected_idx(raw) if raw is not None else "unknown"
    try:
        arr = read_idx(path)
    except CalibError as e:
        assert str(path) in one_line(e)
        assert want in (None, "unknown"), f"read_idx refused a well-formed IDX: {e}"
        return
    if want == "unknown":  # mutated gzip that still decompressed: judge the bytes it holds
        want = expected_idx(gzip.decompress(stored))
    assert want is not None, f"read_idx accepted a malformed IDX as {arr.shape}"
    shape, dtype = want
    assert arr.shape == shape and arr.dtype == dtype.newbyteorder("=")
    header = 4 + 4 * len(shape)
    data = raw if raw is not None else gzip.decompress(stored)
    assert np.array_equal(arr, np.frombuffer(data, dtype=dtype, offset=header).reshape(shape))


def real_idx() -> bytes:
    """A real IDX file: the first 300 MNIST test labels, header rewritten to match."""
    raw = gzip.decompress((ROOT / "data/mnist/t10k-labels-idx1-ubyte.gz").read_bytes())
    return raw[:4] + (300).to_bytes(4, "big") + raw[8:8 + 300]


def small_image_idx() -> bytes:
    raw = gzip.decompress((ROOT / "data/mnist/t10k-images-idx3-ubyte.gz").read_bytes())
    return raw[:4] + (2).to_bytes(4, "big") + raw[8:16] + raw[16:16 + 2 * 784]


REAL = [real_idx(), small_image_idx()]


@st.composite
def mutated_idx(draw):
    raw = bytearray(draw(st.sampled_from(REAL)))
    kind = draw(st.sampled_from(["truncate", "flip_header", "set_byte", "append", "dims"]))
    if kind == "truncate":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif kind == "flip_header":
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, 15))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "set_byte":
        raw[draw(st.integers(0, 15))] = draw(st.integers(0, 255))
    elif kind == "append":
        raw += draw(st.binary(min_size=1, max_size=16))
    else:  # rewrite the type code, the number of dims and the dims themselves
        ndim = draw(st.integers(0, 4))
        raw = (bytes([0, 0, draw(st.sampled_from([*_IDX_DTYPES, 0x0A, 0xFF])), ndim])
               + b"".join(draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big") if draw(st.booleans())
                          else draw(st.integers(0, 400)).to_bytes(4, "big") for _ in range(ndim))
               + bytes(raw[16:]))
    return bytes(raw)


@FUZZ
@given(st.binary(max_size=64))
@example(b"")
@example(b"\x00\x00\x08\x00")
@example(b"\x00\x00\x08\x01\x00\x00\x00\x00")  # zero items: an empty array is correct
@example(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x3f\x80\x00\x00")  # one big-endian float32 1.0
def test_read_idx_random_bytes(raw):
    check_idx(raw, raw, ".idx")


@FUZZ
@given(mutated_idx())
def test_read_idx_mutated_real_files(raw):
    check_idx(raw, raw, "-ubyte")


@FUZZ
@given(mutated_idx())
def test_read_idx_mutated_real_files_gzipped(raw):
    check_idx(raw, gzip.compress(raw, mtime=0), "-ubyte.gz")


@FUZZ
@given(st.binary(max_size=64))
def test_read_idx_random_bytes_named_gz(raw):
    # Bytes that are not gzip at all, under a .gz name (gzip's own header checks refuse them).
    assume(not raw.startswith(b"\x1f\x8b"))
    check_idx(None, raw, ".gz")


# ---------------------------------------------------------------- ONNX checker

def small_onnx() -> bytes:
    """A small real conv classifier (Conv → Relu → Flatten → Gemm) with a dynamic batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((10, 4 * 6 * 6)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fcb")]
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 14, 14])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


ONNX = small_onnx()


def check_onnx_file(data: bytes):
    path = WORK / "fuzz.onnx"
    path.write_bytes(data)
    try:
        info = check_onnx(path)
    except ExportError as e:
        assert one_line(e).startswith("fuzz.onnx: ")
        return
    assert info["inputs"] and isinstance(info["opset"], (int, type(None)))
    json.dumps(info)  # plain data: what reports store


def test_small_onnx_is_valid():
    assert check_onnx(_write(WORK / "ok.onnx", ONNX))["inputs"][0]["shape"] == ["batch", 1, 14, 14]


def _write(path, data):
    path.write_bytes(data)
    return path


@FUZZ
@given(st.binary(max_size=256))
@example(b"")
@example(b"\x08")
def test_check_onnx_random_bytes(data):
    check_onnx_file(data)


@FUZZ
@given(st.data())
def test_check_onnx_mutated_real_model(data):
    raw = bytearray(ONNX)
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "delete", "splice"]))
    if kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "insert":
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    elif kind == "delete":
        at = data.draw(st.integers(0, len(raw) - 1))
        del raw[at:at + data.draw(st.integers(1, 8))]
    else:  # the structure part (everything but the big float payloads) is where parsers trip
        at = data.draw(st.sampled_from([i for i in range(len(raw)) if raw[i] in (0x08, 0x0A, 0x12, 0x1A, 0x22, 0x3A)]))
        raw[at] = data.draw(st.integers(0, 255))
    check_onnx_file(bytes(raw))


@FUZZ
@given(st.data())
def test_read_idx_corrupted_gzip_stream(data):
    raw = bytearray(gzip.compress(REAL[0], mtime=0))
    # Past gzip's 10-byte header, before its 8-byte trailer: the deflate stream itself.
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(10, len(raw) - 9))] = data.draw(st.integers(0, 255))
    check_idx(None, bytes(raw), "-ubyte.gz")
