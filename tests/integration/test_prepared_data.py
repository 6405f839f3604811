"""``klong-data prepare`` -> memory-mapped megatron-core indexed datasets -> the SFT trainer's data.

Samples equal the in-memory path bit for bit on the bundled demo set; a failed prepare resumes without
redoing finished shards; a changed tokenizer/policy, a truncated file or an unfinished prepare is a clear
error; blends follow their weights/epochs and keep the resumable order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from klong_megatron.cli.data import main as data_main
from klong_megatron.config.data import BlendSourceConfig, ContextPolicyConfig, DataConfig
from klong_megatron.data.dataset import SampleOrder, build_sft_datasets
from klong_megatron.data.demo_tasks import DEMO_TRAJECTORIES
from klong_megatron.data.trajectory import TrajectoryError
from klong_megatron.prepared.blend import BlendOrder, cycle_counts
from klong_megatron.prepared.dataset import open_prepared
from klong_megatron.prepared.manifest import PreparedMismatch
from klong_megatron.prepared.prepare import STORE, prepare
from klong_megatron.prepared.store import StoreError, WindowStore
from klong_megatron.sft.data import sft_data

DEMO_CFG = DataConfig(tokenizer="byte", policy=ContextPolicyConfig(max_len=2048, overlap=256, keep_full_turns=4))


def _tiny_trajectory(i: int, turns: int = 6) -> dict:
    msgs = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": f"Task {i}: count."}]
    for t in range(turns):
        msgs.append({"role": "assistant", "content": f"step {t} of task {i}: run ls"})
        msgs.append({"role": "user", "content": f"output {t}: " + "x" * (5 + (i * 7 + t) % 11)})
    return {"id": f"t{i}", "messages": msgs}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _tiny_files(tmp: Path, n_files: int, per_file: int) -> list[Path]:
    return [
        _write(tmp / f"part{f}.jsonl", [json.dumps(_tiny_trajectory(f * per_file + k)) for k in range(per_file)])
        for f in range(n_files)
    ]


TINY_CFG = DataConfig(tokenizer="byte", policy=ContextPolicyConfig(max_len=256, overlap=64), valid_fraction=0.3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[DataConfig, Path]:
    """The demo set as two input files, prepared by two worker processes."""
    tmp = tmp_path_factory.mktemp("demo")
    lines = [ln for ln in Path(DEMO_TRAJECTORIES).read_text().splitlines() if ln.strip()]
    files = [str(_write(tmp / "a.jsonl", lines[::2])), str(_write(tmp / "b.jsonl", lines[1::2]))]
    cfg = DataConfig(**{**DEMO_CFG.__dict__, "train_files": files})
    prepare(files, cfg, tmp / "prepared", workers=2, progress=False)
    return cfg, tmp / "prepared"


def test_prepared_samples_are_bit_identical_to_the_in_memory_path(demo) -> None:
    cfg, directory = demo
    mem_train, mem_valid = build_sft_datasets(cfg, progress=False)
    data = sft_data(DataConfig(**{**cfg.__dict__, "prepared": str(directory)}))
    assert data["order"] is SampleOrder and len(mem_valid) > 0
    for mem, disk in ((mem_train, data["train"]), (mem_valid, data["valid"])):
        assert len(disk) == len(mem) and disk.efficiency == pytest.approx(mem.efficiency, abs=0)
        for i in range(len(mem)):
            a, b = mem[i], disk[i]
            assert a["trajectory_ids"] == b["trajectory_ids"]
            for key in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens"):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (i, key)
    # provenance: every window as split_trajectory made it, in the in-memory order
    store = WindowStore(directory / STORE)
    held = np.asarray(store.rows[:, 4])
    for w, k in zip(mem_train.windows, np.flatnonzero(held == 0), strict=True):
        s = store.window(k)
        assert (s.trajectory_id, s.window_index, s.prefix_len, s.segments) == (
            w.trajectory_id, w.window_index, w.prefix_len, w.segments)  # fmt: skip
        assert np.array_equal(s.positions, w.positions) and np.array_equal(s.input_ids, w.input_ids)


def test_a_changed_tokenizer_policy_or_source_is_refused_naming_both_values(demo, tmp_path: Path) -> None:
    cfg, directory = demo
    with pytest.raises(PreparedMismatch, match=r"data.tokenizer=.*byte.*sha256.*demo_bpe \(sha256"):
        open_prepared(directory, DataConfig(**{**cfg.__dict__, "tokenizer": "demo_bpe"}))
    other = ContextPolicyConfig(**{**cfg.policy.__dict__, "overlap": 128})
    with pytest.raises(PreparedMismatch, match=r"data.policy.overlap=256, but the run has data.policy.overlap=128"):
        open_prepared(directory, DataConfig(**{**cfg.__dict__, "policy": other}))
    with pytest.raises(PreparedMismatch, match=r"data.seq_len \(packed length\)=2048.*=4096"):
        open_prepared(directory, DataConfig(**{**cfg.__dict__, "seq_len": 4096}))
    changed = shutil.copy(cfg.train_files[1], tmp_path / "b.jsonl")
    with pytest.raises(PreparedMismatch, match="data.train_files/valid_files"):
        open_prepared(directory, DataConfig(**{**cfg.__dict__, "train_files": [cfg.train_files[0], changed]}))


def test_truncated_corrupt_or_unfinished_prepared_data_is_a_clear_error(demo, tmp_path: Path) -> None:
    _, directory = demo
    cfg = DataConfig(**{**demo[0].__dict__, "train_files": []})
    bad = Path(shutil.copytree(directory, tmp_path / "bad"))
    tokens = bad / f"{STORE}.tokens.bin"
    size = tokens.stat().st_size
    with open(tokens, "r+b") as f:
        f.truncate(size - 4)
    with pytest.raises(StoreError, match=rf"tokens.bin: {size - 4} bytes, the manifest says {size}"):
        open_prepared(bad, cfg)
    with open(tokens, "ab") as f:
        f.write(b"\0" * 4)
    idx = bad / f"{STORE}.loss_mask.idx"
    idx.write_bytes(b"garbage!!" + idx.read_bytes()[9:])
    with pytest.raises(StoreError, match="loss_mask.idx: not a readable indexed dataset"):
        open_prepared(bad, cfg)
    (bad / "manifest.json").unlink()
    with pytest.raises(ValueError, match="did not finish"):
        open_prepared(bad, cfg)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_prepared(tmp_path / "nowhere", cfg)


def test_an_interrupted_prepare_resumes_without_redoing_finished_shards(tmp_path: Path) -> None:
    a, b, c = _tiny_files(tmp_path, 3, 4)
    good_c = c.read_text()
    c.write_text(good_c + '{"id": "broken", "messages": []}\n')
    with pytest.raises(TrajectoryError, match=r"part2.jsonl:5: field 'messages'"):
        prepare([str(a), str(b), str(c)], TINY_CFG, tmp_path / "out", workers=2, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    done = sorted((tmp_path / "out" / "shards").glob("*.done.json"))
    assert [p.name for p in done] == ["00000.done.json", "00001.done.json"]
    # a finished shard whose file was cut short is redone; the intact one is kept
    with open(tmp_path / "out" / "shards" / "00001.tokens.bin", "r+b") as f:
        f.truncate(8)
    c.write_text(good_c)
    manifest, shards = prepare([str(a), str(b), str(c)], TINY_CFG, tmp_path / "out", workers=2, progress=False)
    assert shards == {"shards": 3, "done_before": 1, "ran": 2}
    fresh, _ = prepare([str(a), str(b), str(c)], TINY_CFG, tmp_path / "fresh", workers=1, progress=False)
    assert manifest.counts == fresh.counts and manifest.pack == fresh.pack
    for name in manifest.files:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    again, shards = prepare([str(a), str(b), str(c)], TINY_CFG, tmp_path / "out", progress=False)
    assert shards["ran"] == 0 and again.counts == manifest.counts


def test_cli_prepare_writes_a_directory_training_reads_and_names_a_missing_input(tmp_path: Path, capsys) -> None:
    (a,) = _tiny_files(tmp_path, 1, 5)
    argv = ["prepare", "--input", str(a), "--out", str(tmp_path / "p"), "--max-len", "256", "--overlap", "64"]
    with pytest.raises(SystemExit) as ok:
        data_main([*argv, "--valid-fraction", "0.3"])
    assert ok.value.code == 0
    data = sft_data(DataConfig(**{**TINY_CFG.__dict__, "prepared": str(tmp_path / "p")}))
    assert len(data["train"]) > 0 and data["info"]["counts"]["trajectories"] == 5
    with pytest.raises(SystemExit) as bad:
        data_main(["prepare", "--input", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "q")])
    assert bad.value.code == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_one_source_blend_is_the_plain_sample_order() -> None:
    order, plain = BlendOrder([7], [7], seed=3), SampleOrder(7, seed=3)
    assert list(zip(range(40), order.indices(0), strict=False)) == list(zip(range(40), plain.indices(0), strict=False))


@pytest.mark.parametrize(("weights", "epochs", "counts"), [((1.0, 1.0), None, [20, 20]), (None, (3.0, 0.5), [30, 15])])
def test_blend_follows_its_mix_sees_every_sample_before_repeats_and_resumes(weights, epochs, counts) -> None:
    sizes = [10, 30]
    assert cycle_counts(sizes, weights, epochs) == counts
    order = BlendOrder(sizes, counts, seed=5)
    stream = [i for _, i in zip(range(4 * order.cycle), order.indices(0), strict=False)]
    for d, (lo, hi) in enumerate(((0, 10), (10, 40))):
        draws = [i for i in stream if lo <= i < hi]
        assert len(draws) == 4 * counts[d]
        for p in range(len(draws) // sizes[d]):  # each pass over a source is a permutation of it
            assert sorted(draws[p * sizes[d] : (p + 1) * sizes[d]]) == list(range(lo, hi))
    share = np.cumsum([lo_src < 10 for lo_src in stream[: order.cycle]]) / np.arange(1, order.cycle + 1)
    assert np.all(np.abs(share[9:] - counts[0] / order.cycle) < 0.1)  # interleaved, not one source after another
    assert order.realised(2 * order.cycle + 7).tolist() == [
        2 * c + int(np.sum(order.source[:7] == d)) for d, c in enumerate(counts)
    ]
    for start in (0, 13, order.cycle, 2 * order.cycle + 5):
        resumed = [i for _, i in zip(range(len(stream) - start), order.indices(start), strict=False)]
        assert resumed == stream[start:]


def test_sft_data_blends_prepared_sources_with_their_items(tmp_path: Path) -> None:
    files = _tiny_files(tmp_path, 2, 4)
    dirs = [tmp_path / "p0", tmp_path / "p1"]
    for f, d in zip(files, dirs, strict=True):
        prepare([str(f)], TINY_CFG, d, progress=False)
    blend = [BlendSourceConfig(path=str(dirs[0]), weight=3.0), BlendSourceConfig(path=str(dirs[1]), weight=1.0)]
    data = sft_data(DataConfig(**{**TINY_CFG.__dict__, "blend": blend}))
    single = [sft_data(DataConfig(**{**TINY_CFG.__dict__, "prepared": str(d)}))["train"] for d in dirs]
    train, n0 = data["train"], len(single[0])
    assert len(train) == n0 + len(single[1])
    assert (
        torch.equal(train[n0]["tokens"], single[1][0]["tokens"])
        and train[1]["trajectory_ids"] == single[0][1]["trajectory_ids"]
    )
    order = data["order"](len(train), TINY_CFG.seed)
    rows = data["info"]["blend"]
    assert [r["per_cycle"] for r in rows] == order.counts.tolist()
    assert rows[0]["share"] == pytest.approx(0.75, abs=0.05)
    with pytest.raises(ValueError, match="weight or epochs"):
        BlendSourceConfig(path="x", weight=1.0, epochs=2.0)
    with pytest.raises(ValueError, match="not a mix"):
        DataConfig(blend=[BlendSourceConfig(path="x", weight=1.0), BlendSourceConfig(path="y", epochs=1.0)])


class _Recorder:
    """Collects what the trainer logs (test double of MetricsLogger's info/log)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.metrics: list[tuple[int, str, dict]] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        self.metrics.append((step, prefix, metrics))


def test_trainer_on_prepared_data_matches_in_memory_and_logs_a_blends_realised_mix(tmp_path: Path) -> None:
    from sft_driver import tiny_config

    from klong_megatron.megatron.parallel import destroy_distributed
    from klong_megatron.sft.trainer import SFTTrainer

    files = _tiny_files(tmp_path, 2, 4)
    for k, f in enumerate(files):
        prepare([str(f)], TINY_CFG, tmp_path / f"p{k}", progress=False)
    base = ["model.vocab_size=320", "model.seq_length=256", "data.policy.max_len=256", "data.policy.overlap=64",
            "data.valid_fraction=0.3", "trainer.train_steps=2", "trainer.global_batch_size=2"]  # fmt: skip
    runs = {
        "memory": [f"data.train_files=[{files[0]}]"],
        "prepared": [f"data.prepared={tmp_path / 'p0'}"],
        "blend": [f"data.blend=[{{path: {tmp_path / 'p0'}, epochs: 2}}, {{path: {tmp_path / 'p1'}, epochs: 1}}]"],
    }
    out, logs = {}, {}
    for name, extra in runs.items():
        logs[name] = _Recorder()
        try:
            out[name] = SFTTrainer(tiny_config([*base, *extra]), tmp_path / name).run(logs[name])
        finally:
            destroy_distributed()
    assert out["prepared"]["losses"] == out["memory"]["losses"]  # same samples, same order, same model
    mix = [m for _, prefix, m in logs["blend"].metrics if prefix == "blend"]
    assert len(mix) == 2 and mix[0]["source0_share"] == pytest.approx(2 / 3, abs=0.1)
    assert mix[0]["source0_realised_share"] + mix[1]["source1_realised_share"] == pytest.approx(1.0)
    assert any(line.startswith("blend source 1: source ") for line in logs["blend"].lines)
