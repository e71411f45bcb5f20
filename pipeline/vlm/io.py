"""The VLM's workload and its measurements: the image-text records a run reads, the model folder every stage
hands on, and the task's figures (pipeline/tasks/vlm.py) of a torch VLM or of a folder of runtime files.

A folder of runtime files (vision.onnx, the inputs_embeds decoder, the embedding table, tokenizer.json,
vlm.json: edgerun/vlm.py's bundle layout) is scored with the runtime's own session and greedy loop, so the
gates judge what the device will run.
"""
from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import numpy as np

from edgerun.io import atomic_write, write_json
from pipeline.errors import PipelineError

MODEL_DIR = "model"             # a stage's VLM folder: decoder/ (Hugging Face), vision.safetensors, vlm.json
FILES_DIR = "files"             # a stage's runtime files (edgerun/vlm.py's layout)
TEST_NEXT = "test_next.npy"     # the unpruned VLM's teacher-forced next tokens on the test rows
ANSWERS = "test_answers.json"   # a stage's greedy answers on the test records


class VLMRunData:
    """The run's records and image banks, read once per process and only when a stage reads them."""

    def __init__(self, cfg):
        self.cfg = cfg

    @cached_property
    def _data(self):
        from pipeline.data import resolve_root
        from pipeline.vlm.byo import tower_input
        from pipeline.vlmdata import DEFAULT_TEST, DEFAULT_TRAIN, VLMData, mnist_vlm_task, read_vlm_jsonl
        d, v = self.cfg.data, self.cfg.vlm
        tower = tower_input(self.cfg)   # your tower's ((H, W), channels) decide how images are read
        if d.kind == "vila-mnist":
            from edgerun.readers import load_mnist
            root = resolve_root(d.root)
            tr_x, tr_y = load_mnist(root, "train")
            te_x, te_y = load_mnist(root, "test")
            train, test = mnist_vlm_task(tr_y, te_y, seed=self.cfg.run.seed,
                                         n_train={**DEFAULT_TRAIN, **v.train_counts},
                                         n_test={**DEFAULT_TEST, **v.test_counts})
            self.mnist = ((tr_x, tr_y), (te_x, te_y))
            if tower is not None:
                tr_x, te_x = (_mnist_for(x, *tower, v.tower_factory) for x in (tr_x, te_x))
            return VLMData(train, test, tr_x, te_x)
        size, channels = tower if tower is not None else (tuple(d.size), d.channels)
        data = read_vlm_jsonl(resolve_root(d.root), size=size, channels=channels)
        return VLMData(data.train[:d.train_subset or None], data.test[:d.test_subset or None], data.train_images,
                       data.test_images)

    @property
    def data(self):
        return self._data

    @property
    def train(self):
        return self._data.train

    @property
    def test(self):
        return self._data.test

    has_answers = True   # every VLM record carries its answer

    def mnist_classes(self):
        """((train images, labels), (test images, labels)) of MNIST (the tower's pre-training) for the embedded
        task; None for a jsonl."""
        _ = self._data   # loading it keeps the MNIST classes of the embedded task
        return getattr(self, "mnist", None)

    def identity(self) -> str:
        """What the run's records are, by content: the records and the bytes of every image they use."""
        data, h = self._data, hashlib.sha256()
        h.update(json.dumps([[r.as_dict() for r in data.train], [r.as_dict() for r in data.test]]).encode())
        for bank, records in ((data.train_images, data.train), (data.test_images, data.test)):
            used = sorted({i for r in records for i in r.images})
            h.update(np.ascontiguousarray(bank[used]).tobytes() if used else b"")
        return h.hexdigest()


def _mnist_for(images: np.ndarray, size, channels: int, factory: str) -> np.ndarray:
    """MNIST's 28x28 grey images as your tower takes them: grey repeated into 3 channels where it takes RGB; a
    tower of another size is refused (resampling digits would change the task)."""
    if tuple(size) != tuple(images.shape[2:]):
        raise PipelineError(f"vlm.tower_factory {factory} takes {list(size)} images; vila-mnist's are "
                            f"{list(images.shape[2:])}: use data.kind = \"vlm-jsonl\" with your images")
    return np.repeat(images, channels, axis=1) if channels != images.shape[1] else images


# ---------------------------------------------------------------- the model folder every stage hands on

def save_vlm(vlm, tok, folder: Path, recipe: dict) -> Path:
    """decoder/ (a Hugging Face folder with tokenizer.json), vision.safetensors (tower encoder + projector,
    whatever their widths) and vlm.json (how to build it again: ``recipe`` = the tower's kwargs and the
    projector's kind, plus each attention's heads). Written into a temporary folder, then renamed."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from pipeline.llm import lm
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".vlm-", dir=folder.parent))
    try:
        lm.save_model(vlm.decoder, tok, tmp / "decoder")
        state = {f"{part}.{k}": v.detach().contiguous() for part in ("vision", "projector")
                 for k, v in getattr(vlm, part).state_dict().items()}
        save_file(state, str(tmp / "vision.safetensors"))
        heads = {n: [int(m.num_heads), int(m.head_dim)] for n, m in vlm.vision.named_modules()
                 if hasattr(m, "qkv") and hasattr(m, "num_heads")}
        write_json(tmp / "vlm.json", {**recipe, "image_token_id": vlm.image_token_id, "heads": heads})
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def load_vlm(folder: Path):
    """(vlm, tok) of a stage's VLM folder. The tower is built from the recipe, then every saved tensor takes
    its place at its saved shape (a pruned tower's widths), every attention its saved heads; a key the model
    lacks or lacks the file is refused, so a folder never half-loads."""
    import torch
    from safetensors.torch import load_file

    from pipeline.llm import lm
    from pipeline.models.tower import VisionTower
    from pipeline.models.vlm import VLM, build_projector
    folder = Path(folder)
    meta = json.loads((folder / "vlm.json").read_text())
    decoder, tok = lm.load_model(folder / "decoder")
    if meta.get("tower_factory"):   # your tower (pipeline/vlm/byo.py), built again by its factory
        from pipeline.vlm.byo import build_tower
        vision, facts = build_tower(meta["tower_factory"], meta["tower"])
        dim = facts["dim"]
    else:
        vision = VisionTower(**meta["tower"])
        dim = vision.norm.normalized_shape[0]
    projector = build_projector(meta["projector"], dim, decoder.config.hidden_size)
    vlm = VLM(vision, projector, decoder, meta["image_token_id"])
    state = load_file(str(folder / "vision.safetensors"))
    for name in ("projector", "classifier") if isinstance(vision, VisionTower) else ():
        if not any(k.startswith(f"vision.{name}.") for k in state):   # the tower's pre-training head, dropped
            delattr(vlm.vision, name)                                  # by pruning
    own = {k for k in vlm.state_dict() if k.split(".")[0] in ("vision", "projector")}
    if own != set(state):
        extra = sorted(set(state) - own) or sorted(own - set(state))
        raise PipelineError(f"vlm: {folder / 'vision.safetensors'} does not fit the recipe in vlm.json "
                            f"({extra[0]})")
    modules = dict(vlm.named_modules())
    for key, value in state.items():
        owner, _, attr = key.rpartition(".")
        setattr(modules[owner], attr, torch.nn.Parameter(value, requires_grad=True)
                if isinstance(getattr(modules[owner], attr), torch.nn.Parameter) else value)
        m = modules[owner]   # the width attributes too: readers of widths (prune_vlm, vlm_facts) ask them
        if isinstance(m, torch.nn.LayerNorm):
            m.normalized_shape = tuple(value.shape)
        elif isinstance(m, torch.nn.Linear) and attr == "weight":
            m.out_features, m.in_features = value.shape
        elif isinstance(m, torch.nn.Conv2d) and attr == "weight":
            m.out_channels, m.in_channels = value.shape[0], value.shape[1] * m.groups
    for name, (heads, head_dim) in meta["heads"].items():
        modules[f"vision.{name}" if name else "vision"].num_heads = heads
        modules[f"vision.{name}" if name else "vision"].head_dim = head_dim
    return vlm.eval(), tok


def read_recipe(folder: Path) -> dict:
    """The recipe a VLM folder was built from (what save_vlm needs to write the folder of a changed copy)."""
    meta = json.loads((Path(folder) / "vlm.json").read_text())
    return {k: meta[k] for k in ("tower", "tower_factory", "projector") if k in meta}


def pruned_parts(pruned: dict) -> str:
    """What the prune stage changed, from its ``pruned`` figures, for the variants' labels: "tower + decoder
    pruned", "decoder pruned, tower whole", ... (a label saying "pruned" of a part kept whole misleads a reader
    comparing rows)."""
    tower = (pruned.get("vision_macs_kept") or 1.0) < 1.0
    decoder = pruned.get("decoder_before") != pruned.get("decoder_after")
    if tower and decoder:
        return "tower + decoder pruned"
    if tower or decoder:
        return f"{'tower' if tower else 'decoder'} pruned, {'decoder' if tower else 'tower'} whole"
    return "nothing pruned"


# ---------------------------------------------------------------- measurements

def _rows(tok, records, tokens_per_image: int):
    from pipeline.vlmdata import encode_vlm
    max_images = max((len(r.images) for r in records), default=0)
    return encode_vlm(tok, records, tokens_per_image, max_images), max_images


def figures(logits: np.ndarray, answers: list[str], records, labels: np.ndarray, teacher_next: np.ndarray) -> dict:
    """The VLM task's figures (VLMMetrics fields) from teacher-forced logits and greedy answers."""
    from pipeline.llm import lm
    from pipeline.tasks.vlm import VLMMetrics
    from pipeline.vlm_train import exact_match_by_kind
    base = lm.measure(logits, answers, [r.as_dict() for r in records], labels, teacher_next, None)
    by_kind = exact_match_by_kind(records, answers)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    return VLMMetrics(**base, per_kind={k: round(v, 4) for k, v in by_kind.items() if k != "all"},
                      counts=counts).to_json()


def torch_logits(vlm, tok, records, bank) -> tuple[np.ndarray, np.ndarray]:
    """(teacher-forced logits [N, T, V], labels [N, T]) of a torch VLM on ``records``."""
    import torch

    from pipeline.vlm_train import VLMView
    (x, y), max_images = _rows(tok, records, vlm.tokens_per_image)
    from pipeline.textdata import special_ids
    view = VLMView(vlm, bank, max_images, special_ids(tok)["pad"]).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 64):
            out.append(view(torch.from_numpy(x[i:i + 64])).logits.float().numpy())
    return np.concatenate(out), y


def measure_torch(vlm, tok, records, bank, teacher_next: np.ndarray | None, max_new_tokens: int):
    """(figures, greedy answers, teacher-forced next tokens) of a torch VLM; ``teacher_next`` None: the VLM is the
    reference itself (its next tokens are what later stages are compared with)."""
    from pipeline.llm import lm
    from pipeline.vlm_train import vlm_answers
    logits, labels = torch_logits(vlm, tok, records, bank)
    own_next = lm.next_tokens(logits)
    answers = vlm_answers(vlm, tok, records, bank, max_new_tokens=max_new_tokens)
    reference = own_next if teacher_next is None else teacher_next
    return figures(logits, answers, records, labels, reference), answers, own_next


def onnx_logits(session, records, images: np.ndarray, labels_width: int) -> np.ndarray:
    """Teacher-forced logits of a runtime folder, one record at a time (nothing cached, no padding)."""
    from pipeline.vlmdata import prompt_ids
    tok = session.tokenizer
    sp_eos = list(session.config.eos_token_id)[0]
    visual = session.image_embeds([images[i] for r in records for i in r.images])   # one batched vision run
    rows, at = [], 0
    for r in records:
        ids = prompt_ids(tok, r, session.config.tokens_per_image)
        ids = ids + tok.encode(r.answer, add_special_tokens=False).ids + [sp_eos]
        embeds = session.embed(ids, visual[at:at + len(r.images)])[None]
        at += len(r.images)
        t = len(ids)
        logits, _ = session.decoder.step(embeds, np.ones((1, t), np.int64), np.arange(t)[None],
                                         session.decoder.empty_past(1))
        rows.append(logits[0])
    out = np.zeros((len(rows), labels_width, rows[0].shape[-1]), np.float32)
    for i, lg in enumerate(rows):
        out[i, :len(lg)] = lg
    return out


def measure_files(folder: Path, records, images: np.ndarray, teacher_next: np.ndarray, max_new_tokens: int,
                  threads: int = 1):
    """(figures, greedy answers) of a folder of runtime files, with edgerun's VLM session and greedy loop."""
    from edgerun.vlm import VLMSession
    session = VLMSession(folder, threads=threads)
    (_, labels), _ = _rows(session.tokenizer, records, session.config.tokens_per_image)
    new = session.greedy([([images[i] for i in r.images], r.prompt) for r in records], max_new_tokens=max_new_tokens)
    eos = set(session.config.eos_token_id)
    answers = [session.decode([i for i in ids if i not in eos]) for ids in new]
    logits = onnx_logits(session, records, images, labels.shape[1])
    return figures(logits, answers, records, labels, teacher_next), answers


def write_answers(path: Path, answers: list[str]) -> None:
    atomic_write(path, json.dumps(answers))
