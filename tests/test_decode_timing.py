"""Decoder timing: the feeds the timer runs (prefill of N tokens, one decode step after P cached) are what the
file takes, and the timing worker compares decoder files in fresh processes like it compares CNNs."""
import json
import shutil

import numpy as np
import pytest
import tiny_decoder
from conftest import one_line

from edgerun.decode_timing import decoder_feed, open_decoder_runs
from edgerun.errors import EdgeError
from edgerun.generate import DecoderSession
from edgerun.timing import Spec, SpecItem, TimingError, repeat_in_processes

# 2 shared cores: one torch thread is several times faster than two (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def onnx_path():
    _, info = tiny_decoder.exported()
    return info["path"]


def test_feeds_are_a_prefill_and_a_decode_step_the_file_runs(onnx_path):
    s = DecoderSession(onnx_path)
    pre = decoder_feed(s, "prefill", 7)
    assert pre["input_ids"].shape == (1, 7) and pre["past_key_values.0.key"].shape == (1, s.kv_heads, 0, s.head_dim)
    logits, past = s.step(pre["input_ids"], pre["attention_mask"], pre["position_ids"],
                          {k: v for k, v in pre.items() if k.startswith("past_")})
    assert logits.shape == (1, 7, s.vocab) and past["past_key_values.0.key"].shape[2] == 7
    dec = decoder_feed(s, "decode", 5)
    assert dec["input_ids"].shape == (1, 1) and dec["attention_mask"].shape == (1, 6)
    assert dec["position_ids"].tolist() == [[5]] and dec["past_key_values.1.value"].shape[2] == 5
    runs, close = open_decoder_runs({"a": onnx_path}, "decode", 5)
    try:
        out = runs["a"]()
        assert out[0].shape == (1, 1, s.vocab) and np.isfinite(out[0]).all()
    finally:
        close()
    for workload, tokens in (("generate", 4), ("decode", 0)):
        with pytest.raises(EdgeError) as e:
            decoder_feed(s, workload, tokens)
        one_line(e.value)


def test_the_worker_compares_decoder_files_in_fresh_processes(onnx_path, tmp_path):
    copy = tmp_path / "same.onnx"
    shutil.copy(onnx_path, copy)
    spec = Spec((SpecItem("ref", str(onnx_path), "onnxruntime-cpu"), SpecItem("same", str(copy), "onnxruntime-cpu")),
                reference="ref", batches=(1,), input_shape=(), threads=1, rounds=5, block_ms=5, warmup=1,
                workload="decode", tokens=8)
    (rep,) = repeat_in_processes(spec, 2)
    pair = rep.pair("same")
    assert rep.processes == 2 and pair.p50_ms > 0 and 0.5 < pair.median < 2.0   # the same file: a ratio near 1
    assert json.loads(json.dumps(rep.to_json()))["batch"] == 1
    with pytest.raises(TimingError, match="batch 1 on onnxruntime-cpu only"):
        repeat_in_processes(Spec(spec.items, reference="ref", batches=(2,), input_shape=(), workload="decode",
                                 tokens=8), 1)
