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
from pipeline.config_check import check
from pipeline.errors import PipelineError
from pipeline.profile import ProfileOptions


@dataclass(frozen=True)
class RunCfg:
    name: str = ""              # run folder under runs/; empty = the config file's stem
    seed: int = 0
    threads: int = 0            # torch/onnxruntime intra-op threads; 0 = library default
    target: str = "cpu"         # cpu | desktop-gpu | jetson-orin (what the bundle is for)


@dataclass(frozen=True)
class TaskCfg:
    kind: str = "auto"          # classify | encode | generate | auto (generate for a decoder: model.name = "decoder"
    #                             or model.pretrained; else the first task claiming the model's outputs)


@dataclass(frozen=True)
class DataCfg:
    kind: str = "mnist"         # mnist | imagefolder | text-task (the decoders' embedded task) | jsonl |
    #                             vila-mnist (the VLM's embedded image-text task) | vlm-jsonl
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
    pretrained: str = ""        # a Hugging Face decoder folder (config.json, safetensors, tokenizer.json), offline


@dataclass(frozen=True)
class BaselineCfg:
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 64
    schedule: str = "constant"  # constant | onecycle | cosine
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
    # Latency targets: "require" fails when the goal is not met (or not verified); "best" ships the
    # fastest verified pick and says the goal was missed. backoff: wider picks, each about 1.18x
    # slower, that the fine-tune stage tries in turn when a pick misses its accuracy gate.
    goal: str = "require"       # require | best
    search_budget_s: float = 600.0  # the latency search's time budget (0 = none): then the best verified pick
    backoff: int = 2
    # Replay instead of search: {group: kept width}, or the widths a prune/finetune record.json holds.
    widths: dict = field(default_factory=dict)
    from_record: str = ""
    gate: str = "warn"          # fail | warn | off
    max_drop: float = 100.0


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
    sharding: str = "ddp"       # ddp | fsdp (nproc > 1; FSDP2 shards a decoder that does not fit one device)
    checkpoint_every: int = -1  # steps between checkpoints inside the run (0 = off; -1 = auto: 100 for a decoder)
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
    min_agreement: float = 99.0  # % of test predictions equal to the FP32 ONNX's, and to the unfused Q/DQ arithmetic
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
class DecoderCfg:
    """What only the decoder stages read (task.kind = "generate"; pipeline/llm/)."""
    max_new_tokens: int = 8       # greedy answer length cap when scoring exact-match
    eval_prompts: int = 0         # held-out prompts scored (0 = the whole test split)
    limits: str = "auto"          # kernel shape limits the pruner keeps to: auto (from run.target) | ort-cpu |
    #                               trt-desktop | jetson-orin (edgerun/llm_limits.json)
    int4_group: int = 128         # INT4 block size; every pruned width is a multiple of it
    awq: bool = True              # NNCF AWQ and scale estimation from the task's prompts
    calib_prompts: int = 32       # prompts the INT4 compression's data-aware steps see
    trt_form: bool = True         # also write the TensorRT-valid INT4 form (blocked symmetric DequantizeLinear)
    accuracy_level: int = 0       # onnxruntime's MatMulNBits compute: 0 float, 4 int8 activations (faster on CPU)
    min_agreement: float = 97.0   # gate: teacher-forced next-token agreement with the unpruned model (%)
    max_perplexity_ratio: float = 0.0  # gate: perplexity at most this times the unpruned model's (0 = unchecked)
    min_parity: float = 99.0      # export gate: % of held-out prompts whose ONNX greedy answer equals torch's
    prefill_tokens: int = 32      # profile: time to first token for a prompt of this many tokens
    decode_past: int = 32         # profile and search: decode time per token with this many tokens cached
    keep_layers: int = 0          # prune: keep this many decoder layers, the least important dropped (0 = all)


@dataclass(frozen=True)
class VLMCfg:
    """What only the VLM stages read (task.kind = "vlm"; pipeline/vlm/). VILA's recipe, in miniature: the tower
    pre-trained on MNIST classes and the decoder on text (the stand-ins for VILA's pretrained CLIP and LLM),
    then three steps (pipeline/vlm_train.py): step 1 the projector alone on captions, step 2 interleaved
    image-text pre-training with the decoder unfrozen, step 3 the instruction mix with text-only data blended
    in. A step's ``mix`` is {question type: share}; ``frozen`` lists parts among vision, projector, decoder."""
    tower: dict = field(default_factory=dict)    # VisionTower kwargs over pipeline.models.vlm's default, or the
    #                                              keyword arguments of tower_factory
    tower_factory: str = ""       # your own tower: package.module:function returning one (pipeline/vlm/byo.py)
    tower_weights: str = ""       # the tower's weights (safetensors or a state_dict file), loaded strictly
    projector: str = "linear"                    # linear (VILA) | mlp2 (Linear, GELU, Linear)
    projector_weights: str = ""   # the projector's weights; empty = random, trained by step 1
    train_counts: dict = field(default_factory=dict)   # {question type: records} over vlmdata.DEFAULT_TRAIN
    test_counts: dict = field(default_factory=dict)    # {question type: records} over vlmdata.DEFAULT_TEST
    tower_epochs: float = 1.0     # tower pre-training on MNIST classes
    text_steps: int = 300         # decoder pre-training on text-only records
    text_lr: float = 2e-3
    batch_size: int = 64
    step1_mix: dict = field(default_factory=lambda: {"caption": 1.0})
    step1_frozen: tuple[str, ...] = ("vision", "decoder")
    step1_steps: int = 150
    step1_lr: float = 2e-3
    step2_mix: dict = field(default_factory=lambda: {"caption": 0.2, "digit": 0.2, "two_image": 0.35,
                                                     "few_shot": 0.25})
    step2_frozen: tuple[str, ...] = ("vision",)
    step2_steps: int = 500
    step2_lr: float = 1e-3
    step3_mix: dict = field(default_factory=lambda: {"digit": 0.2, "two_image": 0.3, "few_shot": 0.2, "text": 0.3})
    step3_frozen: tuple[str, ...] = ("vision",)
    step3_steps: int = 300
    step3_lr: float = 5e-4
    distil_steps: int = 400       # fine-tune: optimizer steps of finetune.batch_size on step 3's mix
    vision_macs: float = 0.5      # prune: the fraction of the tower's MACs kept (1 = the tower unpruned)
    vision_w8a8: bool = True      # quantize: the vision tower to INT8 weights and activations (Q/DQ)
    min_cosine: float = 0.98      # quantize gate: per-token cosine of the W8A8 tower's embeddings vs FP32


@dataclass(frozen=True)
class Config:
    run: RunCfg = field(default_factory=RunCfg)
    task: TaskCfg = field(default_factory=TaskCfg)
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
    decoder: DecoderCfg = field(default_factory=DecoderCfg)
    vlm: VLMCfg = field(default_factory=VLMCfg)

    def section(self, name: str) -> dict:
        return dataclasses.asdict(getattr(self, name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "run.target": ("cpu", "desktop-gpu", "jetson-orin"),
    "data.kind": ("mnist", "imagefolder", "text-task", "jsonl", "vila-mnist", "vlm-jsonl"),
    "vlm.projector": ("linear", "mlp2"),
    "decoder.limits": ("auto", "ort-cpu", "trt-desktop", "jetson-orin"),
    "prune.target": ("ratio", "macs", "latency_ms", "speedup"),
    "prune.importance": ("l1", "l2", "taylor", "bn_scale", "lamp", "random"),
    "prune.goal": ("require", "best"),
    "finetune.schedule": ("onecycle", "cosine", "constant"),
    "baseline.schedule": ("constant", "onecycle", "cosine"),
    "finetune.optimizer": ("adam", "sgd"),
    "finetune.device": ("auto", "cpu", "cuda"),
    "finetune.sharding": ("ddp", "fsdp"),
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


MAX_CONFIG_BYTES = 1 << 20


def read_config(path: str | Path, overrides: list[str] = ()) -> tuple[Config, frozenset[str]]:
    """The config and the keys the file and the overrides set explicitly (for ignored-key warnings)."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{path}: is a folder, not a config file")
    try:
        if not path.exists():
            raise PipelineError(f"{path}: config file not found")
        if not path.is_file():   # a FIFO or a device would block the read or never end
            raise PipelineError(f"{path}: not a regular file, not a config file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise PipelineError(f"{path}: {path.stat().st_size} bytes, more than a config file has "
                                f"({MAX_CONFIG_BYTES >> 20} MiB at most)")
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PipelineError(f"{path}: cannot read the config file ({e.strerror or e})") from None
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
    check(cfg, path)
    return cfg, frozenset(_flat_keys(raw))


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    return read_config(path, overrides)[0]
