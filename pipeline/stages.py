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
from pipeline.package import package_environment, package_keys, package_stage
from pipeline.profile_stage import profile, profile_environment, profile_keys
from pipeline.prune_stage import prune, prune_keys
from pipeline.quantize_stage import quantize, quantize_environment, quantize_gate, quantize_keys
from pipeline.runner import Stage
from pipeline.stage_io import drop_gate

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
