"""Property-based fuzzing of what users hand the pipeline: the config reader (TOML files and --set
values) and the ONNX checker. Bounded, derandomized, no deadline.

Every input either loads or fails with the project's own error (PipelineError, ExportError) whose
message is one line; any other exception is what a user would see as a traceback, so it is a bug.
A config that loads must also mean something: the invariants below are what the stages rely on.
(The IDX and image readers are fuzzed in tests/test_readers.py.)
"""
import atexit
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
from conftest import fuzz_settings, one_line
from hypothesis import example, given
from hypothesis import strategies as st

from export.errors import ExportError
from export.onnx_export import check_onnx
from pipeline.config import Config, read_config
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent
FUZZ = fuzz_settings()
WORK = Path(tempfile.mkdtemp(prefix="fuzz-"))  # hypothesis does not mix with function-scoped tmp_path
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


# ---------------------------------------------------------------- config reader

SECTIONS = {name: list(Config().section(name)) for name in Config.__dataclass_fields__}
VALUES = st.recursive(
    st.none().map(lambda _: "") | st.booleans() | st.integers(-2**63, 2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["cpu", "jetson-orin", "ratio", "l2", "fail", "warn", "int8", "mnist", "a/b", ".x", "..",
                       "a\x00b", "cuda", 0, -1, 1, 2, 10**12, 0.0, 1.0, 1e-300]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


def toml_key(k: str) -> str:
    return json.dumps(k, ensure_ascii=False)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if not isinstance(v, float) or math.isfinite(v):
            return repr(v)
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
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


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def assert_meaningful(cfg: Config, explicit: frozenset):
    """What every stage takes for granted about a config that loaded."""
    values = cfg.to_dict()
    typed = dict(values)
    typed["model"] = {k: v for k, v in values["model"].items() if k != "kwargs"}  # the factory's own business
    for leaf in _leaves(typed):
        assert not isinstance(leaf, float) or math.isfinite(leaf), leaf
        assert not isinstance(leaf, str) or "\0" not in leaf, leaf
    d = cfg.data
    assert len(d.size) == 2 and min(d.size) >= 1 and d.channels in (1, 3)
    assert len(d.mean) == len(d.std) == d.channels and all(0 < s <= 1 for s in d.std)
    assert d.train_subset >= 0 and d.test_subset >= 0 and cfg.run.seed >= 0 and cfg.model.num_classes >= 2
    name = cfg.run.name
    assert name and "/" not in name and not name.startswith(".") and len(name.encode()) <= 255
    assert cfg.finetune.epochs > 0 and cfg.finetune.kd_temperature > 0 and cfg.quantize.calib_size > 0
    assert 0 <= cfg.run.threads <= 1024 and 0 <= cfg.profile.threads <= 1024
    assert cfg.baseline.min_top1 == -1 or 0 <= cfg.baseline.min_top1 <= 100
    image = d.channels * d.size[0] * d.size[1] * 4
    assert max(cfg.profile.batches) * image <= 2 << 30 and cfg.export.example_batch * image <= 2 << 30
    assert all("." in k for k in explicit)


def read_or_pipeline_error(path, overrides=()):
    try:
        cfg, explicit = read_config(path, list(overrides))
    except PipelineError as e:
        one_line(e)
        return None
    assert isinstance(cfg, Config) and isinstance(explicit, frozenset)
    assert_meaningful(cfg, explicit)
    return cfg


@FUZZ
@given(toml_documents())
@example("[prune]\nratio = nan\n")
@example('[run]\nname = "../x"\n')
@example('[run]\nname = "a\\u0000b"\n')
@example("[data]\nsize = [28]\nmean = []\n")
@example("[data]\nsize = [100000, 100000]\n")
@example("[data]\nmean = [123.7]\nstd = [58.4]\n")
@example("[profile]\nbatches = []\n")
@example("[export]\nopset = 9223372036854775807\n")
@example("[run]\nseed = -1\n")
@example("[[run]]\n")
@example("run = 5\n")
def test_config_file_fuzz(text):
    path = WORK / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    read_or_pipeline_error(path)


@FUZZ
@given(st.binary(max_size=200) | st.text(alphabet=st.sampled_from('[]=".=,{}#\n abc1-_tf'), max_size=80))
def test_config_random_text_fuzz(data):
    path = WORK / "raw.toml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    read_or_pipeline_error(path)


OVERRIDE_KEYS = [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys]


@FUZZ
@given(st.lists(st.text(max_size=30)
                | st.builds(lambda k, v: f"{k}={v}",
                            st.sampled_from(OVERRIDE_KEYS + ["run", "x.y", "run.target.x", "a..b"]),
                            st.text(max_size=12) | VALUES.map(toml_value)), max_size=3))
@example(["run.target.x=1"])
@example(["prune.ratio=[1, 2"])
@example(["=1"])
@example(["run.seed=1\nname = 'x'"])
@example(["prune={ratio=0.3}"])
@example(["model.kwargs={depth={a=[1, {b=2}]}}"])
@example(["data.size=[0, 0]"])
@example(["finetune.epochs=0"])
@example(["run.threads=1000000"])
def test_config_override_fuzz(overrides):
    read_or_pipeline_error(ROOT / "configs/cpu.toml", overrides)


@FUZZ
@given(st.sampled_from(OVERRIDE_KEYS), VALUES)
def test_config_override_of_each_real_key(key, value):
    """Every real key with every kind of value: a Config that means something, or one line."""
    read_or_pipeline_error(ROOT / "configs/cpu.toml", [f"{key}={toml_value(value)}"])


def typed_value(key: str):
    """A value of the key's own type (so the type check passes and the meaning checks are what decide)."""
    from pipeline.config import CHOICES
    section, name = key.split(".")
    default = Config().section(section)[name]
    ints = st.integers(-3, 70) | st.sampled_from([0, 1, 2, 10**6, 2**40, -2**40])
    floats = st.floats(-2, 200, allow_nan=False) | st.sampled_from([0.0, 1.0, 1e-12, 1e12, -1.0, 100.0])
    if key in CHOICES:
        return st.sampled_from(CHOICES[key])
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return ints
    if isinstance(default, float):
        return floats
    if isinstance(default, str):
        return st.sampled_from(["", "x", "a/b", "..", "data/mnist", "n" * 300, "a\x00b"])
    if isinstance(default, (tuple, list)):
        item = default[0] if default else ""
        inner = floats if isinstance(item, float) else ints if isinstance(item, int) else st.text(max_size=4)
        return st.lists(inner, min_size=0, max_size=4)
    return st.dictionaries(st.sampled_from(["depth", "width", "classes_arg"]), ints, max_size=2)


SKIP_TYPED = {"run.name", "data.root", "data.kind", "model.factory", "model.weights", "model.name"}  # other tests


@FUZZ
@given(st.data())
def test_config_typed_values_fuzz(data):
    """Values of the right type but maybe no meaning (NaN excluded: the type check has it): most load."""
    keys = data.draw(st.lists(st.sampled_from([k for k in OVERRIDE_KEYS if k not in SKIP_TYPED]), min_size=1,
                              max_size=4, unique=True))
    read_or_pipeline_error(ROOT / "configs/cpu.toml", [f"{k}={toml_value(data.draw(typed_value(k)))}" for k in keys])


def test_the_shipped_configs_are_meaningful():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        assert read_or_pipeline_error(path) is not None, path


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
    graph = helper.make_graph(nodes, "small",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 14, 14])],
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
