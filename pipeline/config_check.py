"""What a config must mean, beyond its types: cross-field rules and values of the right type but no
meaning (NaN is refused at parse time; here: ranges, units, sizes, names, what the libraries can do).

`check(cfg, path)` raises a one-line PipelineError naming the file and the key.
"""
from __future__ import annotations

from pathlib import Path

from export import MIN_OPSET
from pipeline.data import check_root
from pipeline.errors import PipelineError

MAX_INPUT_BYTES = 2 << 30   # one float32 input batch; more is a typo, not a workload for this pipeline
MAX_THREADS = 1024          # more intra-op threads than any CPU this runs on has cores
NAME_MAX = 255              # bytes in one folder name (Linux, macOS)
MAX_EPOCHS = 1000           # training length: more is a typo (an hour of MNIST is ~20 epochs on 2 cores)
MAX_PRUNE_STEPS = 1000


def newest_loadable_opset(limit: int) -> int | None:
    """The newest ai.onnx opset <= ``limit`` that this onnxruntime loads: a model of a newer opset
    exports, then fails in the first stage that runs it. None when onnx/onnxruntime are missing."""
    from edgerun.ort import OrtError, OrtRunner, onnxruntime
    try:
        import onnx
        from onnx import TensorProto, helper
        onnxruntime()
    except (ImportError, OrtError):
        return None
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", io[:1], io[1:])
    for opset in range(min(limit, onnx.defs.onnx_opset_version()), MIN_OPSET - 1, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = min(model.ir_version, 10)
        try:
            OrtRunner(model.SerializeToString())   # the project's session: CPU, from bytes
            return opset
        except OrtError:  # onnxruntime's own Fail/InvalidGraph, wrapped
            continue
    return None


def check(cfg, path: Path) -> None:
    """Cross-field rules and values of the right type but no meaning, one section at a time. The order
    is the order of the messages: the first broken rule is the one reported."""
    def bad(msg):
        raise PipelineError(f"{path}: config: {msg}")
    _check_task(cfg.task.kind, bad)
    _check_decoder(cfg, bad)
    _check_vlm(cfg, bad)
    _check_data(cfg.data, bad)
    if cfg.model.num_classes < 2:
        bad(f"model.num_classes must be >= 2, got {cfg.model.num_classes}")
    if cfg.run.seed < 0:
        bad(f"run.seed must be >= 0 (numpy refuses negative seeds), got {cfg.run.seed}")
    _check_prune_ratios(cfg.prune, bad)
    _check_length(cfg, bad)
    _check_prune(cfg, bad)
    b = cfg.baseline
    # A floor above 100 % fails every run at the gate (exit 2) although nothing was measured wrong.
    if b.min_top1 != -1 and not 0 <= b.min_top1 <= 100:
        bad(f"baseline.min_top1 must be -1 (chance + 10 pt) or a top-1 in [0, 100], got {b.min_top1}")
    _check_finetune(cfg, bad)
    _check_export(cfg.export, bad)
    if not (1 <= cfg.engine.min_batch <= cfg.engine.opt_batch <= cfg.engine.max_batch):
        bad("engine batches must satisfy 1 <= min_batch <= opt_batch <= max_batch")
    _check_quantize(cfg.quantize, bad)
    _check_max_drops(cfg, bad)
    _check_profile(cfg, bad)
    if cfg.package.batch < 1:
        bad("package.batch must be >= 1")
    _check_run_name(cfg.run.name, bad)
    _check_positive(cfg, bad)
    _check_batches(cfg, bad)


def _check_task(kind: str, bad) -> None:
    from pipeline.tasks import kinds  # a task registered before loading (a test's, a user's) counts too
    if kind != "auto" and kind not in kinds():
        bad(f"task.kind must be auto or one of {', '.join(kinds())}, got {kind!r}")


TEXT_DATA = ("text-task", "jsonl")


def _check_decoder(cfg, bad) -> None:
    """A decoder (task.kind = generate, or auto with model.name = "decoder" or model.pretrained) and its data."""
    from pipeline.llm import is_decoder
    d, decoder = cfg.decoder, is_decoder(cfg)
    if decoder != (cfg.data.kind in TEXT_DATA):
        bad(f"data.kind = {cfg.data.kind!r} with task.kind = {cfg.task.kind!r} and model.name = {cfg.model.name!r}: "
            f"a decoder reads text ({' or '.join(TEXT_DATA)}), every other model images")
    if not decoder:
        return
    if cfg.data.kind == "jsonl" and not cfg.data.root:
        bad("data.root: a jsonl dataset needs a .jsonl file or a folder holding train.jsonl and test.jsonl")
    if cfg.model.weights:
        bad("model.weights: a decoder starts from model.pretrained (a Hugging Face folder), not a state_dict")
    if not cfg.model.pretrained and cfg.model.name != "decoder":
        bad(f"model.name = {cfg.model.name!r}: a decoder is model.name = \"decoder\" or model.pretrained = DIR")
    if cfg.prune.target not in ("ratio", "speedup"):
        bad(f"prune.target = {cfg.prune.target!r}: a decoder prunes by ratio or speedup (decode time)")
    g = d.int4_group
    if g < 16 or g & (g - 1):
        bad(f"decoder.int4_group must be a power of two >= 16 (onnxruntime's MatMulNBits), got {g}")
    if d.keep_layers < 0:
        bad(f"decoder.keep_layers must be >= 0 (0 = every layer kept), got {d.keep_layers}")
    for key in ("max_new_tokens", "calib_prompts", "prefill_tokens", "decode_past"):
        if getattr(d, key) < 1:
            bad(f"decoder.{key} must be >= 1, got {getattr(d, key)}")
    if d.accuracy_level not in (0, 1, 2, 3, 4):
        bad(f"decoder.accuracy_level must be 0..4 (onnxruntime's MatMulNBits), got {d.accuracy_level}")
    if d.eval_prompts < 0:
        bad(f"decoder.eval_prompts must be >= 0 (0 = the whole test split), got {d.eval_prompts}")
    for key in ("min_agreement", "min_parity"):
        if not 0 <= getattr(d, key) <= 100:
            bad(f"decoder.{key} is a percentage in [0, 100], got {getattr(d, key)}")
    if d.max_perplexity_ratio < 0:
        bad(f"decoder.max_perplexity_ratio must be >= 0 (0 = unchecked), got {d.max_perplexity_ratio}")


def _check_vlm(cfg, bad) -> None:
    """A VLM (task.kind = vlm, or auto with VLM data or model.name = "vlm") and its data and recipe."""
    from pipeline.vlm import VLM_DATA, is_vlm
    v, vlm = cfg.vlm, is_vlm(cfg)
    if vlm != (cfg.data.kind in VLM_DATA):
        bad(f"data.kind = {cfg.data.kind!r} with task.kind = {cfg.task.kind!r}: a VLM reads image-text records "
            f"({' or '.join(VLM_DATA)}), and only a VLM does")
    if not vlm:
        return
    from pipeline.vlm.byo import check_config
    check_config(cfg, bad)   # your own tower, projector and decoder folder (pipeline/vlm/byo.py)
    if not cfg.model.pretrained and cfg.model.name not in ("vlm", "decoder"):
        bad(f"model.name = {cfg.model.name!r}: a VLM is model.name = \"vlm\" (model.kwargs: the decoder's widths)")
    from pipeline.vlm_train import PARTS
    from pipeline.vlmdata import KINDS
    for name in ("train_counts", "test_counts"):
        for k, n in getattr(v, name).items():
            if k not in KINDS or not isinstance(n, int) or isinstance(n, bool) or n < 0:
                bad(f"vlm.{name}: {k} = {n!r}; expected question types of {', '.join(KINDS)} with counts >= 0")
    for i in (1, 2, 3):
        mix, frozen = getattr(v, f"step{i}_mix"), getattr(v, f"step{i}_frozen")
        if not mix or any(k not in KINDS or not isinstance(s, (int, float)) or s < 0 for k, s in mix.items()):
            bad(f"vlm.step{i}_mix = {mix!r}: expected {{question type: share >= 0}} over {', '.join(KINDS)}")
        if any(p not in PARTS for p in frozen) or set(frozen) == set(PARTS):
            bad(f"vlm.step{i}_frozen = {list(frozen)!r}: parts among {', '.join(PARTS)}, not all of them")
        if getattr(v, f"step{i}_steps") < 0 or not getattr(v, f"step{i}_lr") > 0:
            bad(f"vlm.step{i}_steps must be >= 0 and vlm.step{i}_lr > 0")
    if not 0 < v.vision_macs <= 1:
        bad(f"vlm.vision_macs is the fraction of the tower's MACs kept, in (0, 1], got {v.vision_macs}")
    if not 0 <= v.min_cosine <= 1:
        bad(f"vlm.min_cosine must be in [0, 1], got {v.min_cosine}")
    if cfg.data.kind == "vlm-jsonl" and v.tower_epochs > 0:   # refused, not skipped: the tower would stay random
        bad(f"vlm.tower_epochs = {v.tower_epochs}: the tower pre-trains on MNIST's classes (data.kind = "
            "\"vila-mnist\"); a vlm-jsonl dataset has none: set vlm.tower_epochs = 0")
    if v.tower_epochs < 0 or v.text_steps < 0 or v.batch_size < 1 or not v.text_lr > 0:
        bad("vlm.tower_epochs and vlm.text_steps must be >= 0, vlm.batch_size >= 1 and vlm.text_lr > 0")


def _check_data(d, bad) -> None:
    try:
        check_root(d.root)
    except PipelineError as e:
        bad(str(e))
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


def _check_prune_ratios(p, bad) -> None:
    """The ratio and MACs targets and the step counts (the latency-target keys: _check_prune)."""
    if not 0.0 <= p.ratio < 1.0:
        bad(f"prune.ratio must be in [0, 1), got {p.ratio}")
    if not 0.0 <= p.head_ratio < 1.0:
        bad(f"prune.head_ratio must be in [0, 1), got {p.head_ratio}")
    if not 0.0 < p.max_layer_ratio <= 1.0:
        bad(f"prune.max_layer_ratio must be in (0, 1], got {p.max_layer_ratio}")
    if p.target == "macs" and p.macs <= 0:
        bad("prune.target = 'macs' needs prune.macs > 0 (<= 1: fraction kept, > 1: absolute MACs)")
    if p.target == "latency_ms" and p.latency_ms <= 0:
        bad("prune.target = 'latency_ms' needs prune.latency_ms > 0")
    if p.iterative_steps < 1 or p.latency_batch < 1:
        bad("prune.iterative_steps and prune.latency_batch must be >= 1")


def _check_length(cfg, bad) -> None:
    """Training and pruning that would not end in a working day are typos, refused before they start."""
    for key, value in (("baseline.epochs", cfg.baseline.epochs), ("finetune.epochs", cfg.finetune.epochs),
                       ("finetune.between_steps_epochs", cfg.finetune.between_steps_epochs)):
        if value > MAX_EPOCHS:
            bad(f"{key} = {value}: more than {MAX_EPOCHS} epochs (a typo? the training would not end)")
    if cfg.prune.iterative_steps > MAX_PRUNE_STEPS:
        bad(f"prune.iterative_steps = {cfg.prune.iterative_steps}: more than {MAX_PRUNE_STEPS} pruning steps")


def _check_prune(cfg, bad) -> None:
    """The latency-target keys (config_check.check calls this)."""
    p = cfg.prune
    if p.round_to < 0:
        bad(f"prune.round_to must be >= 0 (0 = auto: the SIMD block on cpu, 8 on GPUs), got {p.round_to}")
    if p.target == "speedup" and p.speedup <= 1.0:
        bad(f"prune.target = 'speedup' needs prune.speedup > 1 (x faster than unpruned), got {p.speedup}")
    if p.latency_threads < 0:
        bad(f"prune.latency_threads must be >= 0 (0 = the library's default), got {p.latency_threads}")
    if p.search_budget_s < 0 or p.backoff < 0 or p.backoff > 8:
        bad(f"prune.search_budget_s must be >= 0 (0 = no budget) and prune.backoff in [0, 8], got "
            f"{p.search_budget_s} and {p.backoff}")
    if p.widths and p.from_record:
        bad("prune.widths and prune.from_record both name the widths to replay: set one")
    for name, w in p.widths.items():
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            bad(f"prune.widths.{name} must be a whole number of channels (or heads) >= 1, got {w!r}")


def _check_finetune(cfg, bad) -> None:
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
    _check_distributed(cfg, bad)
    if f.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            bad("finetune.device = 'cuda' but no CUDA device is present here (use 'auto' or 'cpu')")


def _check_distributed(cfg, bad) -> None:
    """finetune.sharding and finetune.checkpoint_every: refused where they cannot apply, never ignored."""
    from pipeline.llm import is_decoder
    f, decoder = cfg.finetune, is_decoder(cfg)
    if f.sharding == "fsdp" and not decoder:
        bad("finetune.sharding = 'fsdp' shards a decoder's layers; the image models' fine-tune runs DDP: set 'ddp'")
    if f.sharding == "fsdp" and f.nproc < 2:
        bad("finetune.sharding = 'fsdp' shards over several processes: set finetune.nproc >= 2, or sharding = 'ddp'")
    if f.checkpoint_every < -1:
        bad(f"finetune.checkpoint_every must be -1 (auto), 0 (off) or a number of steps, got {f.checkpoint_every}")
    if f.checkpoint_every > 0 and not decoder:
        bad("finetune.checkpoint_every: only the decoder's fine-tune checkpoints inside its run; set it to -1 or 0")
    if f.checkpoint_every > 0 and f.sharding == "fsdp":
        bad("finetune.checkpoint_every: FSDP shards the optimizer state, which these checkpoints do not gather; "
            "set it to 0 with sharding = 'fsdp'")


def _check_export(e, bad) -> None:
    if e.opset < MIN_OPSET:
        bad(f"export.opset = {e.opset}: the exporter (torch.onnx, dynamo) writes opset >= {MIN_OPSET}")
    if e.opset > MIN_OPSET:   # the default needs no probe; a newer one may not load here
        newest = newest_loadable_opset(e.opset)
        if newest is not None and newest < e.opset:
            bad(f"export.opset = {e.opset}: onnx/onnxruntime here load opsets up to {newest}; "
                f"every stage after export runs the model with onnxruntime")
    if e.example_batch < 2:
        bad("export.example_batch must be >= 2: with a batch-1 example torch.export may fix the batch to 1")
    if e.max_abs is not None and e.max_abs < 0 or not 0 < e.min_cosine <= 1:
        bad("export.max_abs must be >= 0 and export.min_cosine in (0, 1]")


def _check_quantize(q, bad) -> None:
    if q.calib_size <= 0:
        bad("quantize.calib_size must be > 0")
    if not 0 <= q.min_agreement <= 100 or not 0 < q.min_cosine <= 1:
        bad("quantize.min_agreement must be in [0, 100] and quantize.min_cosine in (0, 1]")
    # In the task's units (top-1 points for a classifier): a drop of 100 pt or more would accept anything.
    if not 0 <= q.max_drop < 100 or q.choose_val_size < 1 or q.choose_batch < 1:
        bad(f"quantize.max_drop must be in [0, 100) pt (got {q.max_drop}), quantize.choose_val_size and "
            f"quantize.choose_batch >= 1 (got {q.choose_val_size}, {q.choose_batch})")
    if q.enabled and q.keep_fp32 == "listed" and not q.keep_fp32_nodes:
        bad('quantize.keep_fp32 = "listed" needs ONNX node names in quantize.keep_fp32_nodes')


def _check_max_drops(cfg, bad) -> None:
    for key in ("baseline.max_drop", "prune.max_drop", "finetune.max_drop", "export.max_drop", "quantize.max_drop",
                "engine.max_drop"):
        sec, k = key.split(".")
        if hasattr(getattr(cfg, sec), k) and getattr(getattr(cfg, sec), k) < 0:
            bad(f"{key} must be >= 0")


def _check_profile(cfg, bad) -> None:
    """The profile section, and run.threads beside profile.threads."""
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


def _check_positive(cfg, bad) -> None:
    for key in ("baseline.epochs", "baseline.batch_size", "finetune.batch_size", "data.reference_batch",
                "profile.iters"):
        sec, k = key.split(".")
        if getattr(getattr(cfg, sec), k) <= 0:
            bad(f"{key} must be > 0")


def _check_run_name(name: str, bad) -> None:
    """run.name is a folder under --runs: one plain, visible name the OS accepts."""
    if not name:
        return   # empty: read_config takes the config file's stem
    if "/" in name or name.startswith(".") or not name.strip() or len(name.encode()) > NAME_MAX:
        bad(f"run.name {name!r:.80} must be a plain folder name (no '/', not starting with '.', "
            f"at most {NAME_MAX} bytes)")


def _check_batches(cfg, bad) -> None:
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
