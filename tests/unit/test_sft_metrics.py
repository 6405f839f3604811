"""Model FLOPs count attention per packed window, not over the whole packed sequence."""

from __future__ import annotations

import pytest

from klong_megatron.config.model import ModelConfig
from klong_megatron.sft.metrics import datasheet_peak_tflops, flops_per_token, window_training_flops

LLAMA_1B = ModelConfig(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
                       ffn_hidden_size=8192, vocab_size=128256, seq_length=16384, untie_embeddings=False)  # fmt: skip


def test_one_window_filling_the_sequence_is_the_usual_per_token_count() -> None:
    assert window_training_flops(LLAMA_1B, [8192]) == pytest.approx(flops_per_token(LLAMA_1B, 8192) * 8192)


def test_attention_is_summed_per_window_by_hand() -> None:
    n_matmul = LLAMA_1B.num_parameters(active=True)  # tied embeddings: the output layer multiplies, counted once
    d_q, layers = 2048, 16
    windows = [5000, 2000, 1192]
    by_hand = sum(6 * n_matmul * n + 6 * layers * d_q * n * n for n in windows)
    assert window_training_flops(LLAMA_1B, windows) == pytest.approx(by_hand)


@pytest.mark.parametrize(("seq", "overstated"), [(8192, 1.10), (16384, 1.18)])
def test_whole_sequence_attention_overstates_packed_windows(seq: int, overstated: float) -> None:
    """Half-length windows (two per sequence): the old whole-sequence count is ~1.1-1.2x the real one."""
    whole = flops_per_token(LLAMA_1B, seq) * seq
    per_window = window_training_flops(LLAMA_1B, [seq // 2, seq // 2])
    assert whole / per_window == pytest.approx(overstated, abs=0.02)


def test_datasheet_peak_by_device_name() -> None:
    assert datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert datasheet_peak_tflops("NVIDIA H200") == 989.0
    assert datasheet_peak_tflops("Some CPU") is None
