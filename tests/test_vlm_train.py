"""pipeline/vlm_train.py: VLMView on the one training loop, freezing, greedy answers, the three steps."""
import json
import math

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.models.vlm import build_vlm
from pipeline.textdata import special_ids
from pipeline.vlm_train import (
    StepSpec,
    VLMView,
    exact_match_by_kind,
    freeze,
    image_bank,
    pretrain_decoder,
    pretrain_tower,
    sample_mix,
    train_step,
    train_vila,
    vlm_answers,
)
from pipeline.vlmdata import IMAGE_ID, VLMData, build_vlm_tokenizer, encode_vlm, mnist_vlm_task

pytestmark = pytest.mark.usefixtures("one_thread")
RNG = np.random.default_rng(1)
X_TRAIN = RNG.integers(0, 256, (80, 1, 28, 28), dtype=np.uint8)
Y_TRAIN = np.arange(80) % 10
X_TEST = RNG.integers(0, 256, (30, 1, 28, 28), dtype=np.uint8)
Y_TEST = np.arange(30) % 10


def _data(n_train=16, n_test=4):
    train, test = mnist_vlm_task(Y_TRAIN, Y_TEST, n_train=n_train, n_test=n_test)
    return VLMData(train, test, X_TRAIN, X_TEST)


def _vlm(tok, seed=0):
    return build_vlm(tok.get_vocab_size(), image_token_id=IMAGE_ID, special=special_ids(tok), seed=seed,
                     tower=dict(dim=16, depth=1, heads=2),
                     decoder=dict(hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=16, max_position_embeddings=128))


def test_view_gives_the_vlms_logits_on_each_unpacked_sample():
    data = _data()
    tok = build_vlm_tokenizer(data.train)
    vlm = _vlm(tok).eval()
    bank = image_bank(X_TRAIN)
    records = data.train[::3]   # every kind, sequences of different lengths in one batch
    x, y = encode_vlm(tok, records, vlm.tokens_per_image, max_images=3)
    t = y.shape[1]
    with torch.no_grad():
        packed = VLMView(vlm, bank, 3)(torch.from_numpy(x)).logits
        assert packed.shape == (len(records), t, tok.get_vocab_size())
        for i, r in enumerate(records):
            n = int((x[i, :t] != 0).sum())
            ids = torch.from_numpy(x[i:i + 1, :n])
            pixels = bank[list(r.images)] if r.images else None
            alone = vlm(ids, pixels).logits[0]
            torch.testing.assert_close(packed[i, :n], alone, rtol=1e-4, atol=1e-5)
        # a batch of the shorter rows only: the columns past its longest are not computed, and read as 0
        short = [i for i in range(len(records)) if records[i].kind in ("digit", "text")]
        n = int((x[short, :t] != 0).sum(1).max())
        assert n < t
        part = VLMView(vlm, bank, 3)(torch.from_numpy(x[short])).logits
        torch.testing.assert_close(part[:, :n], packed[short, :n], rtol=1e-4, atol=1e-5)
        assert (part[:, n:] == 0).all()


def test_freezing_freezes_and_the_rest_trains():
    data = _data()
    tok = build_vlm_tokenizer(data.train)
    vlm = _vlm(tok)
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    spec = StepSpec("p", {"caption": 1.0}, frozen=("vision", "decoder"), steps=2, batch_size=4, lr=1e-2,
                    schedule="constant")
    info = train_step(vlm, tok, data.train, image_bank(X_TRAIN), spec, max_images=3)
    assert info["steps"] == 2 and math.isfinite(info["losses"][-1])
    after = vlm.state_dict()
    for k, v in before.items():
        same = torch.equal(v, after[k])
        assert same == (not k.startswith("projector.")), k   # frozen bit-identical, the projector moved
    assert all(p.requires_grad for p in vlm.parameters())    # the step leaves nothing frozen behind
    freeze(vlm, ("projector",))
    assert not any(p.requires_grad for p in vlm.projector.parameters())
    assert all(p.requires_grad for p in vlm.decoder.parameters())


def test_step_spec_and_mix_are_checked():
    with pytest.raises(PipelineError, match="frozen part 'llm'"):
        StepSpec("s", {"digit": 1.0}, frozen=("llm",))
    with pytest.raises(PipelineError, match="nothing to train"):
        StepSpec("s", {"digit": 1.0}, frozen=("vision", "projector", "decoder"))
    with pytest.raises(PipelineError, match="mix"):
        StepSpec("s", {})
    train = _data().train
    batch = sample_mix(train, {"digit": 3, "text": 1}, 40, seed=0)
    assert [r.kind for r in batch].count("digit") == 30 and len(batch) == 40
    assert batch == sample_mix(train, {"digit": 3, "text": 1}, 40, seed=0)
    with pytest.raises(PipelineError, match="no train records of kind 'poem'"):
        sample_mix(train, {"poem": 1.0}, 4, seed=0)


def test_answers_do_not_depend_on_the_batch_and_exact_match_by_kind():
    data = _data()
    tok = build_vlm_tokenizer(data.train + data.test)
    vlm = _vlm(tok)
    bank = image_bank(X_TEST)
    together = vlm_answers(vlm, tok, data.test, bank, max_new_tokens=3)
    alone = [vlm_answers(vlm, tok, [r], bank, max_new_tokens=3)[0] for r in data.test]
    assert together == alone and len(together) == len(data.test)
    scores = exact_match_by_kind(data.test, [r.answer + " " for r in data.test[:-1]] + ["wrong"])
    last = data.test[-1].kind
    n_last = sum(r.kind == last for r in data.test)
    assert scores[last] == pytest.approx(100.0 * (n_last - 1) / n_last)
    assert scores["all"] == pytest.approx(100.0 * (len(data.test) - 1) / len(data.test))


def test_tiny_three_step_run_after_pretraining():
    data = _data(n_train=24, n_test=2)
    tok = build_vlm_tokenizer(data.train + data.test)
    vlm = _vlm(tok)
    pretrain_tower(vlm.vision, X_TRAIN, Y_TRAIN, epochs=1, batch_size=40)
    pretrain_decoder(vlm, tok, data, steps=2, batch_size=8)
    steps = [StepSpec("1", {"caption": 1.0}, frozen=("vision", "decoder"), steps=2, batch_size=8),
             StepSpec("2", {"caption": 0.2, "digit": 0.2, "two_image": 0.3, "few_shot": 0.3}, frozen=("vision",),
                      steps=2, batch_size=8),
             StepSpec("3", {"digit": 0.3, "two_image": 0.3, "few_shot": 0.2, "text": 0.2}, frozen=("vision",),
                      steps=2, batch_size=8)]
    seen = []
    results = train_vila(vlm, tok, data, steps, eval_records=data.test, log=seen.append)
    assert [r.name for r in results] == ["1", "2", "3"] and seen == results
    assert all(math.isfinite(r.final_loss) for r in results)
    assert set(results[-1].scores) == {r.kind for r in data.test} | {"all"}


def test_findings_variants_change_only_what_they_name():
    from benchmarks.vila_findings import variant_steps
    from pipeline.vlm_train import VILA_STEPS
    s1, s2, s3 = VILA_STEPS
    assert variant_steps("default", VILA_STEPS) == [s2, s3]
    frozen = variant_steps("llm-frozen-step2", VILA_STEPS)
    assert "decoder" in frozen[0].frozen and "decoder" not in s2.frozen and frozen[1] == s3
    captions = variant_steps("captions-only-step2", VILA_STEPS)
    assert captions[0].mix == {"caption": 1.0} and captions[0].steps == s2.steps
    no_text = variant_steps("no-text-step3", VILA_STEPS)
    assert "text" in s3.mix and "text" not in no_text[1].mix and no_text[0] == s2
    assert s1.frozen == ("vision", "decoder") and s1.mix == {"caption": 1.0}   # VILA step 1: the projector alone


def test_findings_merge_combines_seeds_and_refuses_mismatched_runs(tmp_path):
    from benchmarks.vila_findings import main, merge
    run = lambda seed, scale=1.0: {"scores": {"default": {str(seed): {"text": 90.0 + seed}}},   # noqa: E731
                                   "minutes_per_seed": {str(seed): 40.0}, "scale": scale, "n_test": 300}
    both = merge([run(0), run(1)])
    assert both["scores"]["default"] == {"0": {"text": 90.0}, "1": {"text": 91.0}}
    assert set(both["minutes_per_seed"]) == {"0", "1"}
    with pytest.raises(SystemExit, match="scale"):
        merge([run(0), run(1, scale=0.5)])
    with pytest.raises(SystemExit, match="twice"):
        merge([run(0), run(0)])
    files = []
    for seed in (0, 1):
        files.append(tmp_path / f"s{seed}.json")
        files[-1].write_text(json.dumps(run(seed)))
    main(["--merge", *map(str, files), "--out", str(tmp_path / "all.json")])
    assert "90.5 ± 0.7 (90.0-91.0)" in (tmp_path / "all.md").read_text()
    with pytest.raises(SystemExit, match="not the JSON of a findings run"):
        main(["--merge", str(files[0]), str(tmp_path / "missing.json"), "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()


def test_distillation_from_a_vlm_teacher_runs_on_the_same_loop():
    import copy
    data = _data()
    tok = build_vlm_tokenizer(data.train)
    student = _vlm(tok)
    teacher = copy.deepcopy(student)
    spec = StepSpec("kd", {"digit": 0.5, "few_shot": 0.5}, steps=2, batch_size=4, lr=1e-2, schedule="constant")
    info = train_step(student, tok, data.train, image_bank(X_TRAIN), spec, max_images=3, teacher=teacher,
                      kd_weight=0.5)
    assert math.isfinite(info["losses"][-1])
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters(), strict=True))


def test_token_distillation_pulls_a_perturbed_tower_back_to_the_teachers_image_tokens():
    """finetune.token_weight for a VLM: the projected image tokens are distilled too (the answer logits alone
    give a pruned tower a weak signal). Same steps, same seed: with the token term the student's image tokens end
    closer to the teacher's than without it, and closer than they started."""
    import copy

    import torch.nn.functional as F
    data = _data(n_train=40)
    tok = build_vlm_tokenizer(data.train)
    teacher = _vlm(tok).eval()
    bank = image_bank(X_TRAIN)

    def cos(student):
        with torch.no_grad():
            return float(F.cosine_similarity(student.image_embeds(bank), teacher.image_embeds(bank), dim=-1).mean())
    start = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in start.vision.parameters():
            p.add_(0.3 * torch.randn_like(p))
    spec = StepSpec("kd", {"digit": 0.5, "two_image": 0.5}, frozen=("decoder",), steps=30, batch_size=8, lr=3e-3,
                    schedule="constant")
    ends = {}
    for weight in (0.0, 5.0):
        student = copy.deepcopy(start)
        train_step(student, tok, data.train, bank, spec, max_images=3, teacher=teacher, kd_weight=0.5,
                   token_weight=weight)
        ends[weight] = cos(student)
    assert ends[5.0] > ends[0.0] + 0.02 and ends[5.0] > cos(start) + 0.02, (cos(start), ends)
