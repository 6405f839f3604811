"""torchrun worker for test_hf_convert.py: HF <-> Megatron at TP 2, PP 2 and EP 2 in one launch.

    torchrun --nproc_per_node 2 hf_convert_worker.py WORK_DIR

WORK_DIR holds ``dense_hf`` / ``moe_hf`` (HF exports of the unsharded tiny models, Qwen3- and GLM-4.5-shaped)
and ``dense_dist`` / ``moe_dist`` (their ``klong-convert hf-to-dist`` checkpoints). For each layout (tp2, pp2:
dense; ep2: MoE) both ranks build their shards from another seed, then

1. ``load_hf_weights`` (each rank reads only its own tensors) -> ``hf_tensor_stream`` checksums on rank 0;
2. ``load_checkpoint`` of the converted checkpoint into a third model -> checksums;
3. ``save_checkpoint`` of model 1 to ``WORK_DIR/saved_<layout>`` (for ``dist-to-hf`` in the test).

Rank 0 writes ``WORK_DIR/result.json``: {layout: {"hf": {name: checksum}, "dist": {...}}}. The vocabulary is
padded to 512 rows at every layout (``make_vocab_size_divisible_by`` 256 / TP, as converted with ``--tp 2``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).parent))
from sharded_push_worker import LAYOUTS, build, tiny  # noqa: E402

from klong_megatron.megatron import checkpoint as ckpt  # noqa: E402
from klong_megatron.megatron.hf import load_hf_weights  # noqa: E402
from klong_megatron.megatron.hf_sharded import hf_tensor_stream  # noqa: E402
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed  # noqa: E402
from klong_megatron.rollout.weight_group import tensor_checksum  # noqa: E402


def checksums(model, cfg) -> dict[str, str]:
    return {name: tensor_checksum(t) for name, t in hf_tensor_stream(model, cfg)}


def main() -> None:
    work = Path(sys.argv[1])
    result = {}
    for layout in ("tp2", "pp2", "ep2"):
        parallel = LAYOUTS[layout]
        init_distributed(parallel, seed=1)
        kind = "moe" if layout == "ep2" else "dense"
        cfg = dataclasses.replace(tiny(layout), make_vocab_size_divisible_by=256 // parallel.tp)
        model = build(cfg, parallel, seed=5)
        load_hf_weights(model, work / f"{kind}_hf", cfg)
        from_hf = checksums(model, cfg)
        other = build(cfg, parallel, seed=6)
        ckpt.load_checkpoint(work / f"{kind}_dist", other)
        from_dist = checksums(other, cfg)
        ckpt.save_checkpoint(work / f"saved_{layout}", model, None, None, ckpt.TrainState())
        result[layout] = {"hf": from_hf, "dist": from_dist}
        parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        (work / "result.json").write_text(json.dumps(result))
    destroy_distributed()


if __name__ == "__main__":
    main()
