"""HF import/export of MoE experts under TE grouped-GEMM names (``experts.linear_fc1.weight{e}``, TE
``GroupedLinear``) equals the SequentialMLP mapping (``experts.local_experts.{e}.linear_fc1.weight``).

The grouped module itself needs Transformer Engine on a GPU; here a real SequentialMLP model's state dict is
renamed to the grouped names and both mappings must give the same HF tensors and back.
"""

from __future__ import annotations

import re

import pytest
import torch

from klong_megatron.config.model import ModelConfig
from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.megatron.hf import hf_to_megatron, megatron_to_hf
from klong_megatron.megatron.model import build_gpt
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed

MOE = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                  vocab_size=64, make_vocab_size_divisible_by=64, seq_length=32, num_experts=4, moe_ffn_hidden_size=16,
                  moe_router_topk=2, moe_first_dense_layers=1, qk_layernorm=True,
                  moe_token_dispatcher="allgather")  # fmt: skip
SEQUENTIAL = re.compile(r"\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_distributed(ParallelConfig(), seed=0)
    yield
    destroy_distributed()


def test_grouped_gemm_expert_names_map_to_the_same_hf_tensors_and_back() -> None:
    torch.manual_seed(0)
    model = build_gpt(MOE)
    sequential = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    sequential = {k: v for k, v in sequential.items() if not k.endswith(("tokens_per_expert", "ga_steps"))}
    grouped = {SEQUENTIAL.sub(lambda m: f".experts.{m[2]}.weight{m[1]}", k): v for k, v in sequential.items()}
    assert "decoder.layers.1.mlp.experts.linear_fc1.weight3" in grouped  # the names really changed
    hf_seq, hf_grouped = megatron_to_hf(sequential, MOE), megatron_to_hf(grouped, MOE)
    assert hf_seq.keys() == hf_grouped.keys()
    assert all(torch.equal(hf_seq[k], hf_grouped[k]) for k in hf_seq)
    back = hf_to_megatron(hf_grouped, MOE, set(grouped))
    experts = [k for k in grouped if ".experts.linear_fc" in k]
    assert len(experts) == 2 * MOE.num_experts
    assert all(torch.equal(back[k], grouped[k]) for k in experts)
