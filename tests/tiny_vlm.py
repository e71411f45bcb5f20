"""A tiny random VLM (decoder hidden 128, 2 layers, heads of 64), its bundle, and torch's greedy answers."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
from tiny_decoder import BOS, EOS, PAD, tokenizer

IMAGE_ID = 48            # tiny_decoder's tokenizer has ids 0..47; <image> comes next
VOCAB = IMAGE_ID + 1
TEMPLATES = {"digit": "<image> what digit is this ?", "two_image": "<image> <image> what is the sum ?"}


def vlm_tokenizer():
    tok = tokenizer()
    tok.add_special_tokens(["<image>"])
    assert tok.token_to_id("<image>") == IMAGE_ID
    return tok


def model(seed: int = 0):
    import torch

    from pipeline.models.vlm import build_vlm
    vlm = build_vlm(VOCAB, image_token_id=IMAGE_ID, seed=seed,
                    tower={"dim": 32, "depth": 1, "heads": 2},
                    decoder={"hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
                             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
                             "max_position_embeddings": 128, "tie_word_embeddings": False},
                    special={"pad": PAD, "bos": BOS, "eos": EOS})
    # Random init (std 0.02) gives logits within ~1e-3 of each other and attention that barely mixes positions:
    # widen every decoder matrix so that float rounding between torch and onnxruntime cannot turn a near tie into
    # another greedy token, and so that the answer depends on the images and on the cache, not on the last token.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in vlm.decoder.named_parameters():
            if w.dim() == 2:
                w.copy_(torch.randn(w.shape, generator=g) * (1.0 if "embed" in name or "lm_head" in name else 0.15))
    return vlm.eval()


@functools.cache
def exported():
    """(vlm, VLMFiles, bundle folder) exported once per test process: vlm.json, the three model files,
    tokenizer.json."""
    from edgerun.vlm import write_vlm_json
    from export.vlm import export_vlm, vlm_facts
    vlm = model()
    folder = Path(tempfile.mkdtemp(prefix="tiny_vlm_"))
    files = export_vlm(vlm, folder)
    write_vlm_json(folder, vlm_facts(vlm), TEMPLATES)
    (folder / "tokenizer.json").write_text(vlm_tokenizer().to_str())
    return vlm, files, folder


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (1, 28, 28), dtype=np.uint8) for _ in range(n)]


def torch_greedy(vlm, ids: list[int], ims: list[np.ndarray], max_new_tokens: int) -> list[int]:
    """Greedy by re-running the whole sequence each step (no cache): the reference the runtime must equal. The
    prompt's embeddings are VLM.inputs_embeds'; a generated id is its table row, even the image token's (a random
    model may emit it; it is no image position)."""
    import torch

    from edgerun.pixels import normalise
    pixels = torch.from_numpy(normalise(np.stack(ims), (0.1307,), (0.3081,))) if ims else None
    new: list[int] = []
    table = vlm.decoder.get_input_embeddings()
    with torch.no_grad():
        prompt = vlm.inputs_embeds(torch.tensor([ids]), pixels)
        for _ in range(max_new_tokens):
            embeds = torch.cat([prompt, table(torch.tensor([new], dtype=torch.long))], dim=1)
            logits = vlm.decoder(inputs_embeds=embeds).logits[0, -1]
            new.append(int(torch.argmax(logits)))
            if new[-1] == EOS:
                break
    return new
