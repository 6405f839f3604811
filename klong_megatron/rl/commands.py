"""Training commands every trainer rank executes: rank 0 broadcasts one, all ranks run it.

Commands (``{"op": ...}``): ``update`` (GRPO update on packed rows -> metrics), ``save`` (checkpoint of
policy ``version``), ``sft`` (the trajectory-splitting SFT warm-up, then its weights are loaded),
``reference`` (freeze the KL reference), ``rollback`` (load a checkpoint's weights, scale the learning
rate), ``stop`` (non-zero ranks leave ``follow``); a sharded policy (TP / PP / EP > 1) also has
``export`` (collective HF export, rank 0 writes) and ``contribute`` (send this rank's shards to the weight
push rank 0 runs at the same time), which ``rl/services.py`` broadcasts itself. Rank 0 trains in a
worker thread (``cpu_compat`` state is per thread).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from klong_megatron.config.rl import RLConfig
from klong_megatron.logging import MetricsLogger
from klong_megatron.megatron import cpu_compat
from klong_megatron.rl.policy import Policy, broadcast_object


class TrainCommands:
    """The policy's operations, run in lock-step on every rank."""

    def __init__(self, cfg: RLConfig, out: Path, policy: Policy, save_dir: Path, logger: MetricsLogger) -> None:
        self.cfg, self.out, self.policy, self.save_dir, self.logger = cfg, out, policy, save_dir, logger
        self.sft_log_step = 0
        """metrics step the SFT warm-up ended at (rank 0)"""

    def __call__(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Run one command on every rank (rank 0 broadcasts it); returns rank 0's result."""
        return self.run(broadcast_object(cmd))

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Execute ``cmd`` on this rank (followers: as received from rank 0, without broadcasting again)."""
        with cpu_compat.in_this_thread():  # rank 0 trains in a worker thread
            if cmd["op"] == "update":
                return self.policy.update(cmd["rows"])
            if cmd["op"] == "save":
                self.policy.save(self.save_dir, cmd["version"])
                return {}
            if cmd["op"] == "sft":
                return self._sft_warmup()
            if cmd["op"] == "reference":
                self.policy.freeze_reference(self.out / "reference")
            if cmd["op"] == "export":  # sharded policy: rank 0 writes, every rank sends its shards
                self.policy.export_hf(cmd["path"], None)
            if cmd["op"] == "contribute":  # sharded policy: rank 0 streams the weight push meanwhile
                self.policy.contribute_shards()
            if cmd["op"] == "rollback":
                self.policy.load_weights(cmd["path"])
                return {"lr": self.policy.scale_lr(cmd["lr_factor"])}
        return {}

    def follow(self) -> None:
        """Non-zero ranks: execute rank 0's commands until it says stop."""
        while (cmd := broadcast_object(None))["op"] != "stop":
            self.run(cmd)

    def _sft_warmup(self) -> dict[str, Any]:
        from klong_megatron.config.sft import SFTConfig
        from klong_megatron.sft.trainer import SFTTrainer

        c = self.cfg
        data = c.data
        if c.rl.sft_expert_trajectories and c.tasks.source == "demo":
            data = dataclasses.replace(data, train_files=[str(self._write_expert_data())])
        sft_cfg = SFTConfig(model=c.model, data=data, trainer=c.rl.sft_warmup, logger=c.logger, cluster=c.cluster,
                            name=f"{c.name}-sft")  # fmt: skip
        sft = SFTTrainer(sft_cfg, self.out / "sft")
        summary = sft.run(self.logger)
        self.policy.load_weights(sft.save_dir)
        self.sft_log_step = int(summary["state"]["step"])
        return summary

    def _write_expert_data(self) -> Path:
        import torch.distributed as dist

        from klong_megatron.data.trajectory import write_jsonl
        from klong_megatron.rl.tasks import demo_expert_trajectories

        path = self.out / "sft" / "expert_trajectories.jsonl"
        if dist.get_rank() == 0 and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            trajs = demo_expert_trajectories(self.cfg.tasks, self.cfg.rl.sft_expert_trajectories)
            write_jsonl(path, (t.to_json() for t in trajs))
        broadcast_object(None)  # every rank waits for the file
        return path
