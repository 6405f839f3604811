"""One Megatron forward/backward over a global batch: batches -> forward_step -> loss_func.

Loss: per-token cross entropy over the window loss masks, *mean over the trained tokens of the
global batch*. ``loss_func`` returns ``(sum, count, ...)`` and Megatron (``calculate_per_token_loss``)
divides the gradients by the count summed over micro-batches and data-parallel ranks, so every
trained token weighs the same however windows are spread over micro-batches and ranks.

Batches are dicts from ``collate``: ``tokens``/``labels``/``position_ids`` LongTensor ``[B,S]``,
``loss_mask`` FloatTensor ``[B,S]``, and either ``attention_mask`` BoolTensor ``[B,1,S,S]``
(local spec) or ``cu_seqlens``/``max_seqlen`` (TE THD packing), plus ``trajectory_ids``. A THD
micro-batch is one flat ``[1, T]`` sequence (``sft.batches.thd_batch_for_cp_rank``: segments padded for
context parallelism, ``cu_seqlens_padded``, this CP rank's tokens); through the local spec (CPU tests of
the GPU layout) it carries a ``[1,1,T,T]`` block mask instead of TE's packing metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams

Batch = dict[str, Any]


def to_device(batch: Batch) -> Batch:
    """Move the tensors of a batch to the current CUDA device (no-op on CPU)."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Masked token-loss sum for one micro-batch.

    ``output_tensor``: per-token cross entropy ``[B,S]``; ``loss_mask``: ``[B,S]`` in {0,1}.
    Returns ``(loss_sum, num_tokens, {"lm loss": [loss_sum, num_tokens]})``.
    """
    losses = output_tensor.float()
    mask = loss_mask.to(losses.dtype)
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def packed_seq_params(batch: Batch) -> PackedSeqParams:
    """THD packing metadata for Transformer Engine attention from ``cu_seqlens``/``max_seqlen``.

    With ``cu_seqlens_padded`` (segments padded to a multiple of 2*CP, ``sft.batches.pad_thd``) both are
    passed, as megatron-core's ``get_thd_batch_on_this_cp_rank`` does: TE skips the padding tokens.
    """
    cu = batch["cu_seqlens"].to(torch.int32)
    padded = batch.get("cu_seqlens_padded")
    padded = padded.to(torch.int32) if padded is not None else None
    max_len = int(batch["max_seqlen"])
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=padded,
        cu_seqlens_kv_padded=padded, max_seqlen_q=max_len, max_seqlen_kv=max_len,
    )  # fmt: skip


def moe_padding(model: torch.nn.Module, batch: Batch, shape: torch.Size) -> dict[str, torch.Tensor]:
    """``{"padding_mask": ...}`` (bool, ``shape`` = the tokens', True = padding) for an MoE model whose batch marks
    padding, else ``{}``. megatron-core 0.16.1 ``GPTModel.forward(padding_mask=)``: the router still routes those
    tokens but leaves them out of the aux / z-loss statistics and the expert-bias token counts."""
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    if batch.get("padding_mask") is None or not getattr(inner.config, "num_moe_experts", None):
        return {}
    return {"padding_mask": batch["padding_mask"].reshape(shape)}


def make_forward_step(on_batch: Callable[[Batch], None] | None = None) -> Callable:
    """Megatron ``forward_step_func``: pulls one micro-batch, runs the model with labels.

    ``on_batch`` sees each micro-batch before the forward (the trainer records trajectory ids there
    so that a NaN loss can name them).
    """

    def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
        batch = to_device(next(data_iterator))
        if on_batch is not None:
            on_batch(batch)
        if "cu_seqlens" in batch:  # THD: the micro-batch is one flat sequence of packed windows
            flat = {k: batch[k].reshape(1, -1) for k in ("tokens", "position_ids", "labels", "loss_mask")}
            pad = moe_padding(model, batch, flat["tokens"].shape)
            if "attention_mask" in batch:  # the same flat layout through the local spec: a [1,1,T,T] block mask
                output = model(
                    flat["tokens"], flat["position_ids"], batch["attention_mask"], labels=flat["labels"], **pad
                )
            else:
                output = model(
                    flat["tokens"],
                    flat["position_ids"],
                    None,
                    labels=flat["labels"],
                    packed_seq_params=packed_seq_params(batch),
                    **pad,
                )
            return output, partial(loss_func, flat["loss_mask"])
        pad = moe_padding(model, batch, batch["tokens"].shape)
        output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"], **pad)
        return output, partial(loss_func, batch["loss_mask"])

    return forward_step
