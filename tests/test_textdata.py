"""The decoder workload's text data: the synthetic task, the user's jsonl, the tokenizer and the encoding."""
import json

import pytest

from pipeline.errors import PipelineError
from pipeline.textdata import (
    IGNORE,
    SKILLS,
    SPECIALS,
    build_tokenizer,
    encode,
    number_task,
    read_jsonl,
    save_tokenizer,
    special_ids,
    words,
)


def test_number_words():
    assert [words(n) for n in (0, 13, 20, 42, 99)] == ["zero", "thirteen", "twenty", "forty two", "ninety nine"]
    with pytest.raises(ValueError):
        words(100)


def test_the_task_is_deterministic_per_seed_and_its_splits_share_no_prompt():
    a, b, c = number_task(seed=0, n_train=500, n_test=100), number_task(seed=0, n_train=500, n_test=100), \
        number_task(seed=1, n_train=500, n_test=100)
    assert a == b
    assert a != c
    assert number_task(seed=0, n_train=50, n_test=100)[1] == a[1]   # more training data, same test set
    for train, test in (a, c):
        assert len(train) == 500 and len(test) == 100
        assert len({r["prompt"] for r in test}) == 100
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_the_answers_are_right():
    back = {words(n): n for n in range(100)}
    train, test = number_task(seed=3, n_train=300, n_test=60)
    seen = set()
    for r in train + test:
        nums = [back[w] for w in _numbers(r["prompt"])]
        skill = next(s for s in SKILLS if s in r["prompt"].split())
        seen.add(skill)
        expected = {"plus": lambda n: n[0] + n[1], "minus": lambda n: n[0] - n[1], "after": lambda n: n[0] + 1,
                    "before": lambda n: n[0] - 1, "larger": max, "smaller": min}[skill](nums)
        assert back[r["answer"]] == expected, r
    assert seen == set(SKILLS)


def _numbers(prompt):
    """The number phrases of a prompt (a tens word may be followed by a unit word)."""
    tens = {words(n) for n in range(20, 100, 10)}
    units = {words(n) for n in range(1, 10)}
    every = {words(n) for n in range(20)} | tens
    out, toks = [], prompt.split()
    i = 0
    while i < len(toks):
        if toks[i] in every:
            if toks[i] in tens and i + 1 < len(toks) and toks[i + 1] in units:
                out.append(toks[i] + " " + toks[i + 1])
                i += 1
            else:
                out.append(toks[i])
        i += 1
    return out


# ---------------------------------------------------------------------------------------------------- jsonl
def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_one_file_is_split_by_prompt_and_a_folder_is_read_as_given(tmp_path):
    recs = [json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) for i in range(200)]
    f = _write(tmp_path / "all.jsonl", recs)
    train, test = read_jsonl(f)
    assert len(train) + len(test) == 200 and 0 < len(test) < 60
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    shuffled = _write(tmp_path / "rev.jsonl", recs[::-1])
    assert {r["prompt"] for r in read_jsonl(shuffled)[1]} == {r["prompt"] for r in test}
    d = tmp_path / "d"
    d.mkdir()
    _write(d / "train.jsonl", recs[:5])
    _write(d / "test.jsonl", [json.dumps({"prompt": "x", "answer": "y"})])
    train, test = read_jsonl(d)
    assert [r["prompt"] for r in train] == [f"q{i}" for i in range(5)] and test == [{"prompt": "x", "answer": "y"}]
    _write(d / "test.jsonl", ['{"prompt": "no answer"}'])
    with pytest.raises(PipelineError, match="both have answers or both have none"):
        read_jsonl(d)


@pytest.mark.parametrize("line, expected", [
    ("{not json", "not JSON"),
    ('["a list"]', "a JSON list"),
    ('{"answer": "a"}', 'no "prompt"'),
    ('{"prompt": 3, "answer": "a"}', '"prompt" must be a non-empty string'),
    ('{"prompt": "q", "answer": ""}', '"answer" must be a non-empty string'),
    ('{"prompt": "q", "answer": "a", "label": 1}', "unknown key 'label'"),
    ('{"prompt": "q"}', 'no "answer" where the earlier lines have'),
])
def test_each_bad_line_is_one_line_naming_file_and_line(tmp_path, line, expected):
    f = _write(tmp_path / "d.jsonl", ['{"prompt": "ok", "answer": "fine"}', "", line])
    with pytest.raises(PipelineError, match=expected) as e:
        read_jsonl(f)
    msg = str(e.value)
    assert f"{f}:3:" in msg and "\n" not in msg


def test_missing_files_and_empty_data_are_refused(tmp_path):
    with pytest.raises(PipelineError, match="no such file or folder"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(PipelineError, match="no test.jsonl"):
        _write(tmp_path / "train.jsonl", ['{"prompt": "q"}'])
        read_jsonl(tmp_path)
    with pytest.raises(PipelineError, match="no records"):
        read_jsonl(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(PipelineError, match="empty (train|test) split"):
        read_jsonl(_write(tmp_path / "one.jsonl", ['{"prompt": "q"}']))


# ------------------------------------------------------------------------------------------ tokenizer, encode
@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_tokenizer_round_trip_and_file(tmp_path, kind):
    from tokenizers import Tokenizer
    train, test = number_task(seed=0, n_train=300, n_test=20)
    tok = build_tokenizer([r["prompt"] + " " + r["answer"] for r in train], kind=kind, vocab_size=300)
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3]
    for r in test:
        assert tok.decode(tok.encode(r["prompt"]).ids).strip() == r["prompt"]
    back = Tokenizer.from_file(str(save_tokenizer(tok, tmp_path / "tokenizer.json")))
    assert back.encode(test[0]["prompt"]).ids == tok.encode(test[0]["prompt"]).ids
    if kind == "word":   # a word never seen in training is <unk>, not dropped
        assert tok.encode("seven zebra").ids[-1] == special_ids(tok)["unk"]


def test_labels_train_the_answer_and_eos_only():
    tok = build_tokenizer(["what is one plus two ? three", "the number after nine is ten"])
    sp = special_ids(tok)
    recs = [{"prompt": "what is one plus two ?", "answer": "three"}, {"prompt": "the number after nine is",
                                                                      "answer": "ten"}]
    b = encode(tok, recs)
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (2, 9)
    assert ids[0, 0] == sp["bos"] and ids[0, -1] == sp["eos"]
    assert labels[0].tolist() == [IGNORE] * 7 + [tok.token_to_id("three"), sp["eos"]]
    # the shorter row is right-padded: pad ids, mask 0, labels ignored
    assert ids[1, -1] == sp["pad"] and mask[1].tolist() == [1] * 8 + [0] and labels[1, -1] == IGNORE
    assert labels[1, 6:8].tolist() == [tok.token_to_id("ten"), sp["eos"]]
    full = encode(tok, recs, train_prompt=True)["labels"]
    assert full[0, 0] == IGNORE and full[0, 1:].tolist() == ids[0, 1:].tolist()
    cut = encode(tok, recs, max_len=4)["input_ids"]
    assert cut[0].tolist() == [sp["bos"], tok.token_to_id("?"), tok.token_to_id("three"), sp["eos"]]
