"""The VLM's stages (task.kind = "vlm"): the same stages in the same order as pipeline/stages.py lists, for
VILA's system — a ViT vision tower, a projector and a LLaMA-family decoder, trained with VILA's three steps,
compressed in all three parts, exported as vision.onnx + an inputs_embeds decoder + the embedding table, and
answered by the torch-free runtime (edgerun/vlm.py).

`pipeline.vlm.io` is the one place that knows the libraries underneath (pipeline/vlmdata.py, vlm_train.py,
prune_vlm.py, export/vlm.py, calib/vision.py, calib/int4.py, edgerun/vlm.py); the stage modules here call it
and the task (pipeline/tasks/vlm.py) for what the gates compare.
"""

VLM_DATA = ("vila-mnist", "vlm-jsonl")
# Keys the run's data (io.VLMRunData) reads; its identity is the records' content, so every stage reading the data
# reruns when they change. Your tower (vlm.tower_factory and its kwargs) decides the images' size and channels.
DATA_READS = ("vlm.train_counts", "vlm.test_counts", "vlm.tower_factory", "vlm.tower")


def data_keys_unread(cfg) -> set[str]:
    """Data keys a VLM's data never reads with this config (the runner declares every data key for every stage
    that reads data): the tower decides the pixel normalisation, and the image size and channels too, except
    for the user's images (vlm-jsonl) read for the embedded tower."""
    unread = {"data.mean", "data.std"}
    if cfg.data.kind != "vlm-jsonl" or cfg.vlm.tower_factory:
        unread |= {"data.size", "data.channels"}
    return unread


def is_vlm(cfg) -> bool:
    """Whether a config runs the VLM stages: task.kind = vlm, or auto with a VLM's data or model.name = vlm."""
    kind = cfg.task.kind
    return kind == "vlm" or (kind == "auto" and (cfg.data.kind in VLM_DATA or cfg.model.name == "vlm"))
