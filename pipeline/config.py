"""Typed, frozen configuration loaded from one TOML file per target, with `--set key=value` overrides.

Every section is a dataclass; the field's default is the documented default and its type is the
type a TOML value or an override must have. Unknown keys are errors that suggest the nearest key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from edgerun.errors import EdgeError
from export.trt_options import EngineOptions
from pipeline.errors import PipelineError
from pipeline.profile import ProfileOptions


@dataclass(frozen=True)
class RunCfg:
    name: str = ""              # run folder under runs/; empty = the config file's stem
    seed: int = 0
    threads: int = 0            # torch/onnxruntime intra-op threads; 0 = library default
    target: str = "cpu"         # cpu | desktop-gpu | jetson-orin (what the bundle is for)


@dataclass(frozen=True)
class DataCfg:
    kind: str = "mnist"         # mnist | imagefolder
    root: str = "data/mnist"    # relative to the project folder unless absolute
    channels: int = 1
    size: tuple[int, int] = (28, 28)
    mean: tuple[float, ...] = (0.1307,)
    std: tuple[float, ...] = (0.3081,)
    train_subset: int = 0       # 0 = the whole split; tests use small subsets
    test_subset: int = 0
    reference_batch: int = 64   # the fixed batch every parity check runs on


@dataclass(frozen=True)
class ModelCfg:
    name: str = "simple_cnn"    # a built-in name; ignored when factory is set
    factory: str = ""           # package.module:function for your own model
    kwargs: dict = field(default_factory=dict)
    weights: str = ""           # a state_dict to start from (loaded weights-only); empty = train
    # Loading a pickled checkpoint runs whatever code the file contains: only for files you made.
    unsafe_pickle: bool = False
    weights_strict: bool = True  # false: load what fits, report missing / unexpected / reshaped keys
    num_classes: int = 10


@dataclass(frozen=True)
class BaselineCfg:
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 64
    gate: str = "fail"          # the baseline must beat chance: a run on a broken baseline proves nothing
    min_top1: float = -1.0      # -1 = chance (100 / num_classes) + 10 pt


@dataclass(frozen=True)
class PruneCfg:
    target: str = "ratio"       # ratio | macs | latency_ms | speedup
    ratio: float = 0.5          # channel ratio removed (target = ratio)
    macs: float = 0.0           # <= 1: fraction of baseline MACs to keep; > 1: absolute MACs
    latency_ms: float = 0.0     # budget at latency_batch on the deploy runtime (onnxruntime CPU | TensorRT)
    speedup: float = 4.0        # target = speedup: x faster than the unpruned model there, at latency_batch
    latency_batch: int = 1      # the deployment batch the latency targets are measured at
    latency_threads: int = 1    # onnxruntime intra-op threads for the latency tables (0 = library default)
    importance: str = "l2"      # l1 | l2 | taylor | bn_scale | lamp | random
    global_pruning: bool = False
    # Channel multiple: 0 = auto (the CPU's SIMD block for run.target cpu, 8 for GPU targets); the
    # latency targets take their candidate grid from it.
    round_to: int = 0
    max_layer_ratio: float = 1.0
    iterative_steps: int = 1
    head_ratio: float = 0.0     # > 0: remove this fraction of whole attention heads (ViTs)
    ignored_layers: tuple[str, ...] = ()
    gate: str = "warn"          # fail | warn | off
    max_drop: float = 100.0


def _check_prune(cfg, bad) -> None:
    """The latency-target keys (config._check calls this)."""
    p = cfg.prune
    if p.round_to < 0:
        bad(f"prune.round_to must be >= 0 (0 = auto: the SIMD block on cpu, 8 on GPUs), got {p.round_to}")
    if p.target == "speedup" and p.speedup <= 1.0:
        bad(f"prune.target = 'speedup' needs prune.speedup > 1 (x faster than unpruned), got {p.speedup}")
    if p.latency_threads < 0:
        bad(f"prune.latency_threads must be >= 0 (0 = the library's default), got {p.latency_threads}")


@dataclass(frozen=True)
class FinetuneCfg:
    epochs: float = 1.0
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    schedule: str = "onecycle"  # onecycle | cosine | constant
    kd_temperature: float = 4.0
    kd_weight: float = 0.7      # 0 = labels only
    token_weight: float = 0.0   # encoders: weight of the token-distillation term
    early_stop: bool = True     # stop once held-out train top-1 reaches the teacher's on that slice
    val_size: int = 2000        # held out of the TRAIN split for early stopping
    between_steps_epochs: float = 0.0  # fine-tune between iterative prune steps
    device: str = "auto"        # auto | cpu | cuda
    nproc: int = 1              # > 1: DistributedDataParallel over nproc processes
    gate: str = "fail"
    max_drop: float = 0.5


@dataclass(frozen=True)
class ExportCfg:
    opset: int = 18             # the dynamo exporter writes opset 18 or newer
    example_batch: int = 2      # >= 2: a batch-1 example lets torch.export specialise the batch
    slim: bool = False
    fp16: bool = True           # also write the FP16-typed ONNX (TensorRT 11 strong typing)
    gate: str = "fail"
    max_drop: float = 0.01
    max_abs: float = 1e-4       # output parity on the reference batch
    min_cosine: float = 0.9999


@dataclass(frozen=True)
class QuantizeCfg:
    enabled: bool = True
    target: str = "onnxruntime"  # onnxruntime | tensorrt (symmetric int8 Q/DQ)
    calib_size: int = 512
    accuracy_control: bool = False
    tensorrt_form: bool = True  # also write symmetric signed-int8 Q/DQ when the CPU form differs (TensorRT)
    model_type: str = ""        # "" | transformer
    gate: str = "fail"
    max_drop: float = 0.3
    min_agreement: float = 99.0  # % of test predictions equal to the FP32 ONNX's
    min_cosine: float = 0.99    # encoders: token cosine vs the FP32 ONNX
    # Which layers stay FP32 in the onnxruntime form (not read under accuracy_control, where NNCF
    # reverts layers by accuracy itself): "auto" = per layer, by measured latency and accuracy on a
    # held-out TRAIN slice (calib.choose_quantized_layers); "none" = quantize every layer NNCF can;
    # "listed" = the ONNX node names in keep_fp32_nodes.
    keep_fp32: str = "auto"
    keep_fp32_nodes: tuple[str, ...] = ()
    choose_val_size: int = 1000  # "auto": held-out train images that judge each variant's accuracy
    choose_batch: int = 1        # "auto": the batch each variant is timed at (the deployment batch)


@dataclass(frozen=True)
class EngineCfg(EngineOptions):
    """The engine build options (export.trt_options.EngineOptions) plus what the pipeline does with them."""
    required: bool = False      # true: no TensorRT here is an error, not a skip
    source: str = "int8"        # which ONNX to build from: fp32 | fp16 | int8 (the TensorRT Q/DQ form)
    gate: str = "fail"
    max_drop: float = 0.3


@dataclass(frozen=True)
class ProfileCfg(ProfileOptions):
    """The profile stage's options are pipeline.profile.ProfileOptions (the measurement protocol's too)."""


@dataclass(frozen=True)
class PackageCfg:
    backend: str = "onnxruntime-cpu"  # the backend the target runs
    objective: str = "p50_ms"         # what "fastest" means
    batch: int = 1                    # at which batch size


@dataclass(frozen=True)
class Config:
    run: RunCfg = field(default_factory=RunCfg)
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    baseline: BaselineCfg = field(default_factory=BaselineCfg)
    prune: PruneCfg = field(default_factory=PruneCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)
    export: ExportCfg = field(default_factory=ExportCfg)
    quantize: QuantizeCfg = field(default_factory=QuantizeCfg)
    engine: EngineCfg = field(default_factory=EngineCfg)
    profile: ProfileCfg = field(default_factory=ProfileCfg)
    package: PackageCfg = field(default_factory=PackageCfg)

    def section(self, name: str) -> dict:
        return dataclasses.asdict(getattr(self, name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "run.target": ("cpu", "desktop-gpu", "jetson-orin"),
    "data.kind": ("mnist", "imagefolder"),
    "prune.target": ("ratio", "macs", "latency_ms", "speedup"),
    "prune.importance": ("l1", "l2", "taylor", "bn_scale", "lamp", "random"),
    "finetune.schedule": ("onecycle", "cosine", "constant"),
    "finetune.optimizer": ("adam", "sgd"),
    "finetune.device": ("auto", "cpu", "cuda"),
    "quantize.target": ("onnxruntime", "tensorrt"),
    "quantize.model_type": ("", "transformer"),
    "quantize.keep_fp32": ("auto", "none", "listed"),
    "engine.source": ("fp32", "fp16", "int8"),
    "engine.hardware_compatibility": ("", "ampere_plus"),
    "package.backend": ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt"),
    "package.objective": ("p50_ms", "p99_ms", "size_bytes"),
}
for _s in ("baseline", "prune", "finetune", "export", "quantize", "engine"):
    CHOICES[f"{_s}.gate"] = ("fail", "warn", "off")


def _nearest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(sorted(options))})"


def _coerce(key: str, value, tp):
    """Check a TOML value against a field type; tuples accept lists, floats accept ints."""
    origin = typing.get_origin(tp)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise PipelineError(f"config: {key} must be a finite number, got {value}")
    elif tp is str:
        ok = isinstance(value, str)
        if ok and "\0" in value:  # names files and folders: the OS refuses it with a bare ValueError
            raise PipelineError(f"config: {key} must not contain a NUL character, got {value!r}")
    elif tp is dict or origin is dict:
        ok = isinstance(value, dict)
    elif origin is tuple:
        args = typing.get_args(tp)
        item = args[0]
        ok = isinstance(value, (list, tuple)) and (args[-1] is Ellipsis or len(value) == len(args))
        if ok:
            value = tuple(_coerce(key, v, item) for v in value)
        elif args[-1] is not Ellipsis:   # [H, W]: say how many values, not only their type
            raise PipelineError(f"config: {key} must be a list of {len(args)} values ({_type_name(item)} each), "
                                f"got {type(value).__name__} {value!r}")
    else:  # pragma: no cover - every field type is listed above
        raise TypeError(tp)
    if not ok:
        raise PipelineError(f"config: {key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _type_name(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a table"}.get(tp, str(tp))


def _build(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise PipelineError(f"config: unknown key {full!r}{_nearest(key, hints)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise PipelineError(f"config: [{key}] must be a table, got {value!r}")
            kwargs[key] = _build(tp, value, f"{key}.")
        else:
            value = _coerce(full, value, tp)
            if full in CHOICES and value not in CHOICES[full]:
                raise PipelineError(f"config: {full} = {value!r} is not one of {', '.join(map(repr, CHOICES[full]))}"
                                    f"{_nearest(value, CHOICES[full]) if value else ''}")
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except EdgeError as e:   # a section's own checks (EngineOptions): name the section
        raise PipelineError(f"config: [{prefix.rstrip('.')}] {e}") from None


def parse_override(text: str) -> tuple[list[str], object]:
    """``section.key=value``; the value is read as TOML, else taken as a bare string."""
    if "=" not in text:
        raise PipelineError(f"--set {text!r}: expected section.key=value")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise PipelineError(f"--set {text!r}: the key must be section.key, e.g. prune.ratio=0.5")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except RecursionError:
        raise PipelineError(f"--set {key.strip()}: value nested too deeply") from None
    return parts, value


def _flat_keys(raw: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in raw.items():
        if isinstance(v, dict) and prefix == "" and k in {f.name for f in dataclasses.fields(Config)}:
            out |= _flat_keys(v, f"{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def read_config(path: str | Path, overrides: list[str] = ()) -> tuple[Config, frozenset[str]]:
    """The config and the keys the file and the overrides set explicitly (for ignored-key warnings)."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise PipelineError(f"{path}: config file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:
        raise PipelineError(f"{path}: not valid TOML (nested too deeply)") from None
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise PipelineError(f"--set {text!r}: {p} is not a section")
        node[parts[-1]] = value
    try:
        cfg = _build(Config, raw, "")
    except PipelineError as e:
        raise PipelineError(f"{path}: {e}") from None
    if not cfg.run.name:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=path.stem))
    _check(cfg, path)
    return cfg, frozenset(_flat_keys(raw))


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    return read_config(path, overrides)[0]


MIN_OPSET = 18   # torch.onnx's dynamo exporter cannot write older opsets
MAX_INPUT_BYTES = 2 << 30   # one float32 input batch; more is a typo, not a workload for this pipeline
MAX_THREADS = 1024          # more intra-op threads than any CPU this runs on has cores
NAME_MAX = 255              # bytes in one folder name (Linux, macOS)


def newest_loadable_opset(limit: int) -> int | None:
    """The newest ai.onnx opset <= ``limit`` that this onnxruntime loads: a model of a newer opset
    exports, then fails in the first stage that runs it. None when onnx/onnxruntime are missing."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", io[:1], io[1:])
    for opset in range(min(limit, onnx.defs.onnx_opset_version()), MIN_OPSET - 1, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = min(model.ir_version, 10)
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
            continue
    return None


def _check(cfg: Config, path: Path) -> None:
    """Cross-field rules and values of the right type but no meaning."""
    def bad(msg):
        raise PipelineError(f"{path}: config: {msg}")
    d = cfg.data
    if d.channels not in (1, 3):
        bad(f"data.channels must be 1 or 3, got {d.channels}")
    if len(d.size) != 2 or any(v <= 0 for v in d.size):
        bad(f"data.size must be two positive integers [H, W], got {list(d.size)}")
    if len(d.mean) != d.channels or len(d.std) != d.channels:
        bad(f"data.mean and data.std need {d.channels} values (data.channels)")
    if any(s <= 0 for s in d.std):
        bad("data.std values must be > 0")
    # Pixels are scaled to [0, 1] before normalising: ImageNet's 123.7 / 58.4 (0..255 units) would
    # train and run, only on inputs shifted far from what the model should see.
    if any(not 0 <= m <= 1 for m in d.mean) or any(s > 1 for s in d.std):
        bad(f"data.mean must be in [0, 1] and data.std in (0, 1]: pixels are scaled to [0, 1] first "
            f"(e.g. 0.485, not 123.7), got mean {list(d.mean)}, std {list(d.std)}")
    if d.train_subset < 0 or d.test_subset < 0:
        bad("data.train_subset and data.test_subset must be >= 0 (0 = the whole split)")
    if cfg.model.num_classes < 2:
        bad(f"model.num_classes must be >= 2, got {cfg.model.num_classes}")
    if cfg.run.seed < 0:
        bad(f"run.seed must be >= 0 (numpy refuses negative seeds), got {cfg.run.seed}")
    if not 0.0 <= cfg.prune.ratio < 1.0:
        bad(f"prune.ratio must be in [0, 1), got {cfg.prune.ratio}")
    if not 0.0 <= cfg.prune.head_ratio < 1.0:
        bad(f"prune.head_ratio must be in [0, 1), got {cfg.prune.head_ratio}")
    if not 0.0 < cfg.prune.max_layer_ratio <= 1.0:
        bad(f"prune.max_layer_ratio must be in (0, 1], got {cfg.prune.max_layer_ratio}")
    if cfg.prune.target == "macs" and cfg.prune.macs <= 0:
        bad("prune.target = 'macs' needs prune.macs > 0 (<= 1: fraction kept, > 1: absolute MACs)")
    if cfg.prune.target == "latency_ms" and cfg.prune.latency_ms <= 0:
        bad("prune.target = 'latency_ms' needs prune.latency_ms > 0")
    if cfg.prune.iterative_steps < 1 or cfg.prune.latency_batch < 1:
        bad("prune.iterative_steps and prune.latency_batch must be >= 1")
    _check_prune(cfg, bad)
    b = cfg.baseline
    # A floor above 100 % fails every run at the gate (exit 2) although nothing was measured wrong.
    if b.min_top1 != -1 and not 0 <= b.min_top1 <= 100:
        bad(f"baseline.min_top1 must be -1 (chance + 10 pt) or a top-1 in [0, 100], got {b.min_top1}")
    f = cfg.finetune
    # 0 epochs is refused by the trainer after baseline and prune ran: say it before anything runs.
    if f.epochs <= 0 or f.between_steps_epochs < 0 or f.lr <= 0 or cfg.baseline.lr <= 0:
        bad(f"finetune.epochs must be > 0 (got {f.epochs}), finetune.between_steps_epochs >= 0, "
            f"learning rates > 0")
    if f.kd_temperature <= 0:
        bad(f"finetune.kd_temperature must be > 0, got {f.kd_temperature}")
    if not 0.0 <= f.kd_weight <= 1.0 or f.token_weight < 0:
        bad("finetune.kd_weight must be in [0, 1] and finetune.token_weight >= 0")
    if f.nproc < 1 or f.val_size < 0:
        bad("finetune.nproc must be >= 1 and finetune.val_size >= 0")
    if f.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            bad("finetune.device = 'cuda' but no CUDA device is present here (use 'auto' or 'cpu')")
    if cfg.export.opset < MIN_OPSET:
        bad(f"export.opset = {cfg.export.opset}: the exporter (torch.onnx, dynamo) writes opset >= {MIN_OPSET}")
    if cfg.export.opset > MIN_OPSET:   # the default needs no probe; a newer one may not load here
        newest = newest_loadable_opset(cfg.export.opset)
        if newest is not None and newest < cfg.export.opset:
            bad(f"export.opset = {cfg.export.opset}: onnx/onnxruntime here load opsets up to {newest}; "
                f"every stage after export runs the model with onnxruntime")
    if cfg.export.example_batch < 2:
        bad("export.example_batch must be >= 2: with a batch-1 example torch.export may fix the batch to 1")
    if cfg.export.max_abs is not None and cfg.export.max_abs < 0 or not 0 < cfg.export.min_cosine <= 1:
        bad("export.max_abs must be >= 0 and export.min_cosine in (0, 1]")
    if not (1 <= cfg.engine.min_batch <= cfg.engine.opt_batch <= cfg.engine.max_batch):
        bad("engine batches must satisfy 1 <= min_batch <= opt_batch <= max_batch")
    if cfg.quantize.calib_size <= 0:
        bad("quantize.calib_size must be > 0")
    q = cfg.quantize
    if not 0 <= q.min_agreement <= 100 or not 0 < q.min_cosine <= 1:
        bad("quantize.min_agreement must be in [0, 100] and quantize.min_cosine in (0, 1]")
    # The stage hands max_drop to calib as a fraction, which must stay below 1 (100 pt).
    if not 0 <= q.max_drop < 100 or q.choose_val_size < 1 or q.choose_batch < 1:
        bad(f"quantize.max_drop must be in [0, 100) pt (got {q.max_drop}), quantize.choose_val_size and "
            f"quantize.choose_batch >= 1 (got {q.choose_val_size}, {q.choose_batch})")
    if q.enabled and q.keep_fp32 == "listed" and not q.keep_fp32_nodes:
        bad('quantize.keep_fp32 = "listed" needs ONNX node names in quantize.keep_fp32_nodes')
    for key in ("baseline.max_drop", "prune.max_drop", "finetune.max_drop", "export.max_drop", "quantize.max_drop",
                "engine.max_drop"):
        sec, k = key.split(".")
        if hasattr(getattr(cfg, sec), k) and getattr(getattr(cfg, sec), k) < 0:
            bad(f"{key} must be >= 0")
    p = cfg.profile
    if any(b <= 0 for b in p.batches) or not p.batches:
        bad("profile.batches must be positive integers")
    if p.rounds < 1 or p.slower_tolerance < 0 or p.time_budget_s < 0:
        bad("profile.rounds must be >= 1, profile.slower_tolerance and profile.time_budget_s >= 0")
    if p.warmup < 0 or p.block_ms <= 0 or p.processes < 1:
        bad(f"profile.warmup must be >= 0 (got {p.warmup}), profile.block_ms > 0 (got {p.block_ms}) and "
            f"profile.processes >= 1 (got {p.processes})")
    if cfg.run.threads < 0 or p.threads < 0:
        bad("run.threads and profile.threads must be >= 0 (0 = the library's default)")
    for key, value in (("run.threads", cfg.run.threads), ("profile.threads", p.threads)):
        if value > MAX_THREADS:
            bad(f"{key} = {value}: more than {MAX_THREADS} threads (a typo? 0 = the library's default)")
    if cfg.package.batch < 1:
        bad("package.batch must be >= 1")
    _check_run_name(cfg.run.name, bad)
    for key in ("baseline.epochs", "baseline.batch_size", "finetune.batch_size", "data.reference_batch",
                "profile.iters"):
        sec, k = key.split(".")
        if getattr(getattr(cfg, sec), k) <= 0:
            bad(f"{key} must be > 0")
    _check_batches(cfg, bad)


def _check_run_name(name: str, bad) -> None:
    """run.name is a folder under --runs: one plain, visible name the OS accepts."""
    if not name:
        return   # empty: read_config takes the config file's stem
    if "/" in name or name.startswith(".") or not name.strip() or len(name.encode()) > NAME_MAX:
        bad(f"run.name {name!r:.80} must be a plain folder name (no '/', not starting with '.', "
            f"at most {NAME_MAX} bytes)")


def _check_batches(cfg: Config, bad) -> None:
    """Every input batch the stages allocate (float32 [N, C, H, W]) must be a size a machine can hold:
    a huge one fails deep in torch with a C++ allocator message, or never returns."""
    image = cfg.data.channels * cfg.data.size[0] * cfg.data.size[1] * 4
    batches = {"data.size (the model probe, batch 2)": 2, "export.example_batch": cfg.export.example_batch,
               "profile.batches": max(cfg.profile.batches), "engine.max_batch": cfg.engine.max_batch,
               "package.batch": cfg.package.batch, "prune.latency_batch": cfg.prune.latency_batch}
    for key, n in batches.items():
        if n * image > MAX_INPUT_BYTES:
            bad(f"{key}: a float32 batch of {n} x {cfg.data.channels}x{cfg.data.size[0]}x{cfg.data.size[1]} "
                f"is {n * image / 2**30:.1f} GiB, more than the {MAX_INPUT_BYTES >> 30} GiB this pipeline allows")
