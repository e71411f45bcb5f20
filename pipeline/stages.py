"""Every stage of the pipeline, in order. Start reading here: the list below is the whole pipeline.

Each stage lives in its own module (`pipeline/<name>_stage.py`; the package stage in package.py) with
its keys, its run and its gate. A stage declares the config keys it reads (they may depend on the
mode: `prune.ratio` only under `target = "ratio"`), the earlier stages it reads and whether it reads
the dataset. It gets exactly that (anything else raises ContractError), writes only into `ctx.out`,
and returns an Output. Its gate is a separate function of its metrics, so changing a gate re-evaluates
it without a rerun. Adding a stage is one new module and one line here (docs/architecture.md).
"""
from __future__ import annotations

from pipeline.baseline_stage import baseline, baseline_gate, baseline_keys
from pipeline.engine_stage import engine, engine_environment, engine_keys
from pipeline.export_stage import export_gate, export_keys, export_onnx
from pipeline.finetune_stage import finetune, finetune_gate, finetune_keys
from pipeline.llm import baseline as llm_baseline
from pipeline.llm import engine as llm_engine
from pipeline.llm import export as llm_export
from pipeline.llm import finetune as llm_finetune
from pipeline.llm import is_decoder
from pipeline.llm import package as llm_package
from pipeline.llm import profile as llm_profile
from pipeline.llm import prune as llm_prune
from pipeline.llm import quantize as llm_quantize
from pipeline.package import package_environment, package_keys, package_stage
from pipeline.profile_stage import profile, profile_environment, profile_keys
from pipeline.prune_stage import prune, prune_keys
from pipeline.quantize_stage import quantize, quantize_environment, quantize_gate, quantize_keys
from pipeline.runner import Stage
from pipeline.stage_io import drop_gate
from pipeline.vlm import baseline as vlm_baseline
from pipeline.vlm import engine as vlm_engine
from pipeline.vlm import export as vlm_export
from pipeline.vlm import finetune as vlm_finetune
from pipeline.vlm import is_vlm
from pipeline.vlm import package as vlm_package
from pipeline.vlm import profile as vlm_profile
from pipeline.vlm import prune as vlm_prune
from pipeline.vlm import quantize as vlm_quantize

# ---------------------------------------------------------------- the list

GATE_KEYS = ("gate", "max_drop")
STAGES = [
    Stage("baseline", 3, baseline, baseline_keys, uses_data=True, measures=True, gate=baseline_gate,
          gate_config=("baseline.gate", "baseline.min_top1")),
    Stage("prune", 3, prune, prune_keys, ("baseline",), uses_data=True,
          measures=True, gate=drop_gate("prune", "baseline"),
          gate_config=("prune.gate", "prune.max_drop")),
    Stage("finetune", 4, finetune, finetune_keys, ("baseline", "prune"), uses_data=True, measures=True,
          gate=finetune_gate, gate_config=("finetune.gate", "finetune.max_drop", "prune.goal")),
    Stage("export_onnx", 3, export_onnx, export_keys, ("baseline", "finetune"), uses_data=True,
          measures=True, gate=export_gate,
          gate_config=("export.gate", "export.max_drop", "export.max_abs", "export.min_cosine")),
    Stage("quantize", 4, quantize, quantize_keys, ("baseline", "export_onnx"), uses_data=True,
          measures=True, gate=quantize_gate,
          gate_config=("quantize.gate", "quantize.max_drop", "quantize.min_agreement", "quantize.min_cosine"),
          environment=quantize_environment),
    Stage("engine", 2, engine, engine_keys, ("export_onnx", "quantize"), uses_data=True, measures=True,
          gate=drop_gate("engine", "export_onnx"), gate_config=("engine.gate", "engine.max_drop"),
          environment=engine_environment),
    Stage("profile", 5, profile, profile_keys, ("baseline", "finetune", "export_onnx", "quantize", "engine"),
          environment=profile_environment),
    Stage("package", 4, package_stage, package_keys,
          ("baseline", "prune", "finetune", "export_onnx", "quantize", "engine", "profile"), uses_data=True,
          folder="deploy", environment=package_environment),
]

# ---------------------------------------------------------------- the same stages for a decoder (task.kind = generate)
# Same names, order and folders; what each does for a decoder lives in pipeline/llm/ (docs/architecture.md).

LLM_GATE = ("decoder.min_agreement", "decoder.max_perplexity_ratio")
DECODER_STAGES = [
    Stage("baseline", 1, llm_baseline.baseline, llm_baseline.baseline_keys, uses_data=True, measures=True,
          gate=llm_baseline.baseline_gate, gate_config=("baseline.gate", "baseline.min_top1")),
    Stage("prune", 1, llm_prune.prune, llm_prune.prune_keys, ("baseline",), uses_data=True, measures=True,
          gate=llm_finetune.quality_gate("prune", "baseline"), gate_config=("prune.gate", "prune.max_drop", *LLM_GATE)),
    Stage("finetune", 2, llm_finetune.finetune, llm_finetune.finetune_keys, ("baseline", "prune"), uses_data=True,
          measures=True,
          gate=llm_finetune.quality_gate("finetune", "baseline"),
          gate_config=("finetune.gate", "finetune.max_drop", *LLM_GATE)),
    Stage("export_onnx", 1, llm_export.export_onnx, llm_export.export_keys, ("baseline", "finetune"), uses_data=True,
          measures=True,
          gate=llm_export.export_gate, gate_config=("export.gate", "export.max_drop", "decoder.min_parity")),
    Stage("quantize", 1, llm_quantize.quantize, llm_quantize.quantize_keys, ("baseline", "finetune", "export_onnx"),
          uses_data=True, measures=True, gate=llm_quantize.quantize_gate,
          gate_config=("quantize.gate", "quantize.max_drop", *LLM_GATE), environment=quantize_environment),
    Stage("engine", 1, llm_engine.engine, llm_engine.engine_keys, ()),
    Stage("profile", 1, llm_profile.profile, llm_profile.profile_keys, ("export_onnx", "quantize"),
          environment=profile_environment),
    Stage("package", 1, llm_package.package_stage, llm_package.package_keys,
          ("baseline", "prune", "finetune", "export_onnx", "quantize", "profile"), uses_data=True, folder="deploy",
          environment=llm_package.package_environment),
]


# ---------------------------------------------------------------- the same stages for a VLM (task.kind = vlm)
# VILA's system: a vision tower, a projector and a decoder (pipeline/vlm/, docs/architecture.md).

VLM_GATE = ("decoder.min_agreement", "decoder.max_perplexity_ratio")
VLM_STAGES = [
    Stage("baseline", 1, vlm_baseline.baseline, vlm_baseline.baseline_keys, uses_data=True, measures=True,
          gate=vlm_baseline.baseline_gate, gate_config=("baseline.gate", "baseline.min_top1")),
    Stage("prune", 1, vlm_prune.prune, vlm_prune.prune_keys, ("baseline",), uses_data=True, measures=True,
          gate=vlm_finetune.quality_gate("prune", "baseline"), gate_config=("prune.gate", "prune.max_drop", *VLM_GATE)),
    Stage("finetune", 1, vlm_finetune.finetune, vlm_finetune.finetune_keys, ("baseline", "prune"), uses_data=True,
          measures=True, gate=vlm_finetune.quality_gate("finetune", "baseline"),
          gate_config=("finetune.gate", "finetune.max_drop", *VLM_GATE)),
    Stage("export_onnx", 1, vlm_export.export_onnx, vlm_export.export_keys, ("baseline", "finetune"), uses_data=True,
          measures=True, gate=vlm_export.export_gate,
          gate_config=("export.gate", "export.max_drop", "decoder.min_parity")),
    Stage("quantize", 1, vlm_quantize.quantize, vlm_quantize.quantize_keys, ("baseline", "finetune", "export_onnx"),
          uses_data=True, measures=True, gate=vlm_quantize.quantize_gate,
          gate_config=("quantize.gate", "quantize.max_drop", "vlm.min_cosine", *VLM_GATE),
          environment=quantize_environment),
    Stage("engine", 1, vlm_engine.engine, vlm_engine.engine_keys, ()),
    Stage("profile", 1, vlm_profile.profile, vlm_profile.profile_keys, ("export_onnx", "quantize"),
          environment=profile_environment),
    Stage("package", 1, vlm_package.package_stage, vlm_package.package_keys,
          ("baseline", "prune", "finetune", "export_onnx", "quantize", "profile"), uses_data=True, folder="deploy",
          environment=vlm_package.package_environment),
]


def stages_for(cfg) -> list:
    if is_vlm(cfg):
        return VLM_STAGES
    return DECODER_STAGES if is_decoder(cfg) else STAGES
