"""pipeline/vlmdata.py: the embedded MNIST task, the user's vlm-jsonl, the tokenizer and the packing."""
import json

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.textdata import IGNORE, words
from pipeline.vlmdata import (
    IMAGE,
    IMAGE_ID,
    KINDS,
    VLMRecord,
    build_vlm_tokenizer,
    encode_vlm,
    mnist_vlm_task,
    read_vlm_jsonl,
)
from tests.conftest import one_line

RNG = np.random.default_rng(0)
Y_TRAIN = RNG.integers(0, 10, 500)
Y_TEST = RNG.integers(0, 10, 200)


def _task(**kw):
    return mnist_vlm_task(Y_TRAIN, Y_TEST, n_train=kw.pop("n_train", 40), n_test=kw.pop("n_test", 20), **kw)


def test_generation_is_deterministic_and_counts_by_kind():
    a, b = _task(seed=3), _task(seed=3)
    assert a == b
    assert _task(seed=4)[0] != a[0]
    train, test = _task(n_train={"digit": 7, "few_shot": 5}, n_test={"digit": 3, "few_shot": 2},
                        kinds=("digit", "few_shot"))
    assert [r.kind for r in train].count("digit") == 7 and [r.kind for r in train].count("few_shot") == 5
    assert len(test) == 5
    # one kind's count does not move another kind's records
    more = _task(n_train={"digit": 7, "few_shot": 9}, n_test=2, kinds=("digit", "few_shot"))[0]
    assert [r for r in more if r.kind == "digit"] == [r for r in train if r.kind == "digit"]
    with pytest.raises(PipelineError, match="unknown kind"):
        _task(kinds=("digit", "poem"))


def test_answers_follow_the_labels_of_their_split():
    train, test = _task(n_train=60, n_test=60)
    for records, labels in ((train, Y_TRAIN), (test, Y_TEST)):
        for r in records:
            assert r.prompt.split().count(IMAGE) == len(r.images)
            assert all(0 <= i < len(labels) for i in r.images)   # test records index the test split only
            d = [int(labels[i]) for i in r.images]
            if r.kind == "digit":
                assert r.answer == words(d[0])
            elif r.kind == "caption":
                assert r.answer == f"a handwritten {words(d[0])}"
            elif r.kind == "few_shot":
                assert r.answer == words(d[2]) and f"is a {words(d[0])} ." in r.prompt
                assert r.prompt.endswith(f"{IMAGE} is a")   # the query's digit is in its image only
            elif r.kind == "two_image":
                want = {"sum": words(d[0] + d[1]), "larger": words(max(d)), "same": "yes" if d[0] == d[1] else "no"}
                assert r.answer == next(v for k, v in want.items() if k in r.prompt)
    answers = {r.answer for r in train if r.kind == "two_image" and "same" in r.prompt}
    assert answers == {"yes", "no"}


def test_text_records_answer_their_question_in_words():
    train, test = _task(kinds=("text",), n_train=400, n_test=100)
    assert all(r.kind == "text" and r.images == () and IMAGE not in r.prompt for r in train + test)
    value = {words(d): d for d in range(19)}
    for r in train + test:
        nums = [value[w] for w in r.prompt.replace(",", " ").split() if w in value]
        q = next(k for k in ("plus", "larger", "same", "after") if k in r.prompt.split())
        want = {"plus": words(sum(nums)), "larger": words(max(nums)), "same": "yes" if len(set(nums)) == 1 else "no",
                "after": words(nums[0] + 1)}[q]
        assert r.answer == want, r
    for q in ("plus", "larger", "same", "after"):   # every question, both yes and no, in each split
        assert any(q in r.prompt.split() for r in test), q
    assert {r.answer for r in train if "same" in r.prompt.split()} == {"yes", "no"}
    assert test != train[:100]   # the test draw is its own stream, not training's first records


def test_tokenizer_image_is_id_4_and_never_split():
    tok = build_vlm_tokenizer(_task()[0])
    assert tok.token_to_id(IMAGE) == IMAGE_ID == 4
    assert tok.encode(f"{IMAGE} {IMAGE} what is the sum ?", add_special_tokens=False).ids[:2] == [4, 4]
    assert tok.token_to_id("seven") is not None


def test_encode_vlm_layout():
    train, _ = _task(kinds=("digit", "few_shot", "text"), n_train=3)
    tok = build_vlm_tokenizer(train)
    x, y = encode_vlm(tok, train, tokens_per_image=5, max_images=3)
    t = y.shape[1]
    assert x.shape == (len(train), t + 3) and x.dtype == y.dtype == np.int64
    for row, lab, r in zip(x, y, train, strict=True):
        ids, index = row[:t], row[t:]
        assert list(index[:len(r.images)]) == list(r.images) and (index[len(r.images):] == -1).all()
        assert (ids == IMAGE_ID).sum() == 5 * len(r.images)
        kept = lab[lab != IGNORE]
        answer = tok.encode(r.answer, add_special_tokens=False).ids + [2]
        assert list(kept) == answer                                  # the answer and </s>, nothing else
        assert list(ids[np.flatnonzero(lab != IGNORE)]) == answer    # labels sit on the answer's own positions
    with pytest.raises(PipelineError, match="max_images"):
        encode_vlm(tok, train, tokens_per_image=5, max_images=2)
    with pytest.raises(PipelineError, match="max_len"):
        encode_vlm(tok, train, tokens_per_image=5, max_images=3, max_len=10)


# ------------------------------------------------------------------------------------------ vlm-jsonl
def _png(path, value):
    from PIL import Image
    Image.fromarray(np.full((10, 12), value, np.uint8)).save(path)


def _write(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_read_vlm_jsonl_file_split_and_folder(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(6):
        _png(tmp_path / "img" / f"{i}.png", 40 * i)
    recs = [{"images": [f"img/{i % 6}.png"], "prompt": f"{IMAGE} what is {i} ?", "answer": f"a{i}", "kind": "digit"}
            for i in range(60)] + [{"images": [], "prompt": "hello", "answer": "world", "kind": "my own kind"}]
    data = read_vlm_jsonl(_write(tmp_path / "all.jsonl", recs), size=(8, 8))
    assert data.train and data.test and len(data.train) + len(data.test) == 61
    assert data.train_images.shape[1:] == (1, 8, 8) and data.train_images.dtype == np.uint8
    assert {r.kind for r in data.train + data.test} == {"digit", "my own kind"}
    again = read_vlm_jsonl(_write(tmp_path / "rev.jsonl", recs[::-1]), size=(8, 8))
    assert {r.prompt for r in again.test} == {r.prompt for r in data.test}   # split by content, not order
    for d in (data,):
        for records, bank in ((d.train, d.train_images), (d.test, d.test_images)):
            for r in records:
                if r.images:   # the pixels follow the record: image i of the prompt "what is i" is 40 * (i % 6)
                    i = int(r.prompt.split()[3])
                    assert int(bank[r.images[0]].mean()) == 40 * (i % 6)
    folder = tmp_path / "f"
    folder.mkdir()
    _png(folder / "a.png", 7)
    _write(folder / "train.jsonl", [{"images": ["a.png"], "prompt": f"{IMAGE} x", "answer": "y"}])
    _write(folder / "test.jsonl", [{"images": ["a.png", "a.png"], "prompt": f"{IMAGE} {IMAGE} z", "answer": "w"}])
    d = read_vlm_jsonl(folder, size=(4, 4), channels=3)
    assert d.train[0] == VLMRecord((0,), f"{IMAGE} x", "y", "user") and d.test[0].images == (0, 0)
    assert d.test_images.shape == (1, 3, 4, 4)


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "<image> a", "answer": "b"}', "no 'images'"),
    ('{"images": ["a.png"], "answer": "b"}', "no 'prompt'"),
    ('{"images": ["a.png"], "prompt": "<image> a"}', "no 'answer'"),
    ('{"images": ["a.png"], "prompt": "<image> <image> a", "answer": "b"}', "2 <image> placeholders .* 1 images"),
    ('{"images": ["a.png", "a.png"], "prompt": "<image> a", "answer": "b"}', "1 <image> placeholders .* 2 images"),
    ('{"images": ["nope.png"], "prompt": "<image> a", "answer": "b"}', "image 'nope.png' not found"),
    ('{"images": ["bad.png"], "prompt": "<image> a", "answer": "b"}', "unreadable image"),
    ('{"images": ["a.png"], "prompt": "<image> a", "answer": "b", "kind": 3}', "\"kind\" must be a string"),
    ('{"images": "a.png", "prompt": "<image> a", "answer": "b"}', "must be a list of image paths"),
    ('{"images": ["a.png"], "prompt": "<image> a", "answer": "b", "label": 1}', "unknown key 'label'"),
    ('[1, 2]', "a JSON list"),
    ('{"images": [', "not JSON"),
])
def test_read_vlm_jsonl_bad_records_are_one_line_naming_file_and_line(tmp_path, line, match):
    _png(tmp_path / "a.png", 1)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    good = '{"images": ["a.png"], "prompt": "<image> a", "answer": "b"}'
    path = _write(tmp_path / "d.jsonl", [good, good, line])
    with pytest.raises(PipelineError, match=match) as e:
        read_vlm_jsonl(path)
    assert one_line(e.value).startswith(f"{path}:3: ")


def test_read_vlm_jsonl_missing_paths(tmp_path):
    with pytest.raises(PipelineError, match="no such file or folder"):
        read_vlm_jsonl(tmp_path / "nothing.jsonl")
    with pytest.raises(PipelineError, match="no test.jsonl"):
        _write(tmp_path / "train.jsonl", ['{"images": [], "prompt": "a", "answer": "b"}'])
        read_vlm_jsonl(tmp_path)


def test_kinds_constant_matches_the_embedded_task():
    assert {r.kind for r in _task()[0]} == set(KINDS)
