"""Padding tokens stay out of MoE routing statistics (megatron-core 0.16.1 ``GPTModel.forward(padding_mask=)``).

The fill after a packed row's last window and the padding added for context parallelism are marked in
``padding_mask`` (``data.dataset.collate``, ``sft.batches.pad_thd``) and passed to MoE models: the router leaves
them out of its load-balancing aux loss and expert-bias token counts. So the padding's content cannot change
the gradient: two batches that differ only in their padding tokens give the same gradients (and differ without
the mask), in the row layout and in the flat THD layout with CP-style padding. CPU, one process, the tiny
GLM-shaped MoE model of ``test_moe_model.py`` with an aux loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sft_driver import tiny_config
from test_moe_model import MOE

from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.data.dataset import block_causal_mask, collate, sequence_item
from klong_megatron.data.pack import build_sequence
from klong_megatron.megatron.model import build_gpt
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed, set_seed
from klong_megatron.megatron.step import make_forward_step
from klong_megatron.sft.batches import pad_thd

SEQ = 64


@pytest.fixture(scope="module")
def model():
    init_distributed(ParallelConfig(), seed=0)
    set_seed(3)
    yield build_gpt(tiny_config([*MOE, "model.moe_aux_loss_coeff=0.1"]).model)
    destroy_distributed()


def _items(pad_id: int) -> list[dict]:
    """Two packed rows of random windows (row fill tokens = ``pad_id``)."""
    g = np.random.default_rng(0)
    rows = [[17, 20], [31]]
    out = []
    for r, lengths in enumerate(rows):
        windows = [(g.integers(1, 60, n), np.ones(n, np.float32), f"t{r}.{i}") for i, n in enumerate(lengths)]
        out.append(sequence_item(build_sequence(windows, SEQ, pad_id)))
    return out


def _grads(model, batch: dict, *, with_mask: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    if not with_mask:
        batch = {k: v for k, v in batch.items() if k != "padding_mask"}
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.router")]
    for r in routers:
        r.local_tokens_per_expert.zero_()
    model.zero_grad()
    output, loss_func = make_forward_step()(iter([batch]), model)
    loss_func(output)[0].backward()
    counted = int(routers[0].local_tokens_per_expert.sum())
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, counted


def _assert_grads(a: dict, b: dict, *, equal: bool) -> None:
    same = all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-5 * float(a[n].abs().max())) for n in a)  # fp32 sums
    assert same == equal


def test_row_fill_is_marked_and_its_content_does_not_change_moe_gradients(model) -> None:
    first, second = collate(_items(pad_id=0)), collate(_items(pad_id=9))
    assert first["padding_mask"].sum(1).tolist() == [SEQ - 37, SEQ - 31]
    assert not torch.equal(first["tokens"], second["tokens"])
    (g1, counted), (g2, _) = _grads(model, first), _grads(model, second)
    _assert_grads(g1, g2, equal=True)
    assert counted == 2 * (37 + 31)  # top-2 routing of the real tokens only (expert-bias counts)
    _assert_grads(_grads(model, first, with_mask=False)[0], _grads(model, second, with_mask=False)[0], equal=False)


def test_context_parallel_padding_is_marked_in_the_flat_thd_layout(model) -> None:
    batch = collate(_items(pad_id=0), attention="thd")
    flat, padded = pad_thd(batch, 1), pad_thd(batch, 8)  # 8 = 2 * CP 4: every window padded at its end
    assert padded["tokens"].shape[1] > flat["tokens"].shape[1]
    assert int((~padded["padding_mask"]).sum()) == int((~flat["padding_mask"]).sum()) == 37 + 31
    for b in (flat, padded):
        b["attention_mask"] = block_causal_mask(b["cu_seqlens_padded"], b["tokens"].shape[1])[None]
    (g_flat, n_flat), (g_padded, n_padded) = _grads(model, flat), _grads(model, padded)
    assert n_flat == n_padded == 2 * (37 + 31)
    _assert_grads(g_flat, g_padded, equal=True)
    row, _ = _grads(model, collate(_items(pad_id=0)))
    _assert_grads(g_flat, row, equal=True)  # flat THD layout == row layout
