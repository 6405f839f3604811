"""The SFT trainer's data: in memory (small corpora, the demo) or memory-mapped prepared data (any size).

``sft_data(cfg.data)`` returns the trainer's data dict (``train``, ``valid``, ``collate``, ``order``, ``info``):
- no ``data.prepared`` / ``data.blend``: ``build_sft_datasets`` renders, splits and packs in this process;
- ``data.prepared=DIR``: one directory from ``klong-data prepare``, checked against ``cfg`` (policy,
  tokenizer hash, packed length, split settings), order ``SampleOrder`` as in memory;
- ``data.blend=[{path, weight | epochs}, ...]``: several such directories, order ``BlendOrder``; ``info``
  holds the mix per source (share, epochs per cycle) that the trainer logs with the realised one.
"""

from __future__ import annotations

from typing import Any

from klong_megatron.config.data import BlendSourceConfig, DataConfig


def sft_data(cfg: DataConfig) -> dict[str, Any]:
    """Datasets, collate and sample order for :class:`~klong_megatron.sft.trainer.SFTTrainer` from ``cfg``."""
    from klong_megatron.data.dataset import SampleOrder, build_sft_datasets, collate

    if not cfg.prepared and not cfg.blend:
        train, valid = build_sft_datasets(cfg)
        return {"train": train, "valid": valid, "collate": collate, "order": SampleOrder, "info": {}}
    from klong_megatron.prepared.blend import BlendOrder, ConcatDataset, mix_table
    from klong_megatron.prepared.dataset import open_prepared

    if cfg.prepared:
        train, valid, manifest = open_prepared(cfg.prepared, cfg)
        info = {"prepared": cfg.prepared, "packing_efficiency": train.efficiency, "counts": manifest.counts}
        return {"train": train, "valid": valid, "collate": collate, "order": SampleOrder, "info": info}
    opened = [open_prepared(s.path, cfg, f"data.blend[{k}].path") for k, s in enumerate(cfg.blend)]
    sizes = [len(t) for t, _, _ in opened]
    counts = _counts(cfg.blend, sizes)
    order = BlendOrder(sizes, counts, cfg.seed)

    def make_order(num_samples: int, seed: int) -> BlendOrder:
        assert num_samples == sum(sizes) and seed == cfg.seed, (num_samples, seed)
        return order

    train = ConcatDataset([t for t, _, _ in opened])
    valid = ConcatDataset([v for _, v, _ in opened])
    info = {"blend": mix_table([s.path for s in cfg.blend], order), "blend_order": order}
    return {"train": train, "valid": valid, "collate": collate, "order": make_order, "info": info}


def _counts(sources: list[BlendSourceConfig], sizes: list[int]) -> list[int]:
    from klong_megatron.prepared.blend import cycle_counts

    if sources[0].epochs is not None:
        return cycle_counts(sizes, None, [float(s.epochs or 0) for s in sources])
    return cycle_counts(sizes, [float(s.weight or 0) for s in sources], None)
