"""Peak resident memory of a decoder file at work, one fresh process per file (edgerun/decode_memory.py)."""
import pytest
import tiny_decoder
from conftest import one_line

from edgerun.decode_memory import PeakMemoryError, peak_rss


def _bigger(tmp_path):
    """A decoder whose FP32 weights (~34 MB) dwarf the tiny one's, so its peak must show them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from export.decoder import export_decoder
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    weights = sum(p.numel() * 4 for p in model.parameters()) / (1 << 20)
    return export_decoder(model, tmp_path / "big.onnx")["path"], weights


@pytest.mark.slow
def test_each_file_gets_its_own_peak_in_a_fresh_process(tmp_path, one_thread):
    _, info = tiny_decoder.exported()
    small = peak_rss(info["path"], prefill_tokens=16, decode_past=32, threads=1)
    assert 0 < small.import_rss_mib <= small.peak_rss_mib
    big_path, weights_mib = _bigger(tmp_path)
    big = peak_rss(big_path, prefill_tokens=16, decode_past=32, threads=1)
    # the bigger file's weights are resident at its peak; the small one's process never saw them
    assert big.peak_rss_mib - small.peak_rss_mib > 0.8 * weights_mib, (small, big, weights_mib)
    again = peak_rss(info["path"], prefill_tokens=16, decode_past=32, threads=1)   # not masked by the big one
    assert again.peak_rss_mib < big.peak_rss_mib - 0.8 * weights_mib


def test_bad_requests_are_one_line(tmp_path):
    with pytest.raises(PeakMemoryError, match="no such file") as e:
        peak_rss(tmp_path / "none.onnx", prefill_tokens=4, decode_past=4)
    one_line(e.value)
    with pytest.raises(PeakMemoryError, match="decode_past must be a positive integer"):
        peak_rss(tmp_path / "none.onnx", prefill_tokens=4, decode_past=0)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(PeakMemoryError, match="the worker failed") as e:
        peak_rss(tmp_path / "junk.onnx", prefill_tokens=4, decode_past=4)
    one_line(e.value)
