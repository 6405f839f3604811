"""Service lifecycle of an RL run (trainer rank 0): judge, sandbox pool, rollout servers, weight sync.

Start order: judge (queue + cache under ``output_dir/judge``) -> sandbox pool -> rollout servers
(dev-server subprocesses, or the SGLang servers of ``rollout.servers``) -> distributed weight group
(``rl.weight_sync=distributed``) -> first push of the current policy version. ``stop`` undoes it in
reverse and is safe after a partial start. ``push(version)`` gives every server policy ``version``: a
broadcast from rank 0, or an HF export on disk (``weights/v<version>``, the last two kept) that the
servers load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path
from typing import Any

from klong_megatron.config.rl import RLConfig
from klong_megatron.rl.policy import Policy, broadcast_object


class RLServices:
    """What rank 0 runs beside training; ``judge``, ``pool``, ``servers`` are set by ``start``."""

    def __init__(self, cfg: RLConfig, out: Path, policy: Policy | None, tokenizer: Any) -> None:
        self.cfg, self.out, self.policy, self.tokenizer = cfg, out, policy, tokenizer
        self.servers: Any = None
        self.sync: Any = None
        self.pool: Any = None
        self.judge: Any = None
        self._judge_pool: Any = None
        self.stage_root: Path | None = None

    def export(self, version: int) -> Path:
        """HF weights of the policy as ``weights/v<version>`` (kept: the last two versions)."""
        path = self.out / "weights" / f"v{version:05d}"
        if not (path / "model.safetensors").exists():
            if self.policy.sharded:  # collective: the other ranks send their shards (rl/commands.py "export")
                broadcast_object({"op": "export", "path": str(path)})
            self.policy.export_hf(path, self.tokenizer)
        for old in sorted((self.out / "weights").glob("v*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    async def start(self, version: int) -> None:
        """Judge, sandbox pool, rollout servers (healthy), weight group; the servers get ``version``."""
        await self.start_rollouts(self.export(version))
        if self.cfg.rl.weight_sync == "distributed":
            self.sync = self._distributed_sync()
        await self.push(version)

    async def start_rollouts(self, model_dir: Path | None = None) -> None:
        """What rollouts need: judge, sandbox pool, rollout servers (healthy). Without a policy (the rollout
        service, ``klong-rollout-service``) the servers are ``rollout.servers`` and ``model_dir`` is None."""
        from klong_megatron.judge.factory import build_judge
        from klong_megatron.rl.servers import RolloutServers
        from klong_megatron.sandbox.pool import SandboxPool
        from klong_megatron.tasks.workspace import staging_root

        jcfg = dataclasses.replace(
            self.cfg.judge,
            cache_path=self.cfg.judge.cache_path or str(self.out / "judge" / "cache.sqlite"),
            state_dir=self.cfg.judge.state_dir or str(self.out / "judge" / "queue"),
        )
        self.judge, self._judge_pool = build_judge(jcfg)
        await self.judge.__aenter__()
        self.stage_root = staging_root()  # paper tasks' read-only copies (rl/paper_tasks.py)
        self.pool = SandboxPool(self.cfg.sandbox, self.cfg.rollout.concurrency)
        await asyncio.to_thread(self.pool.start)
        self.servers = RolloutServers(self.cfg.rollout, model_dir or "")
        await self.servers.wait_healthy()

    def _distributed_sync(self) -> Any:
        import socket

        import torch

        from klong_megatron.rl.weight_sync import DistributedWeightSync, free_port

        r = self.cfg.rl
        return DistributedWeightSync(
            self.servers.engine,
            master_address=r.weight_sync_address or socket.gethostname(),
            master_port=r.weight_sync_port or free_port(),
            backend="nccl" if torch.cuda.is_available() else "gloo",
            bucket_bytes=self.cfg.rollout.weight_bucket_mb << 20,
            verify=self.cfg.rollout.weight_verify,
        )

    async def push(self, version: int) -> None:
        """The servers get policy ``version``: by broadcast (distributed) or an HF export on disk."""
        if self.sync is not None:
            if self.policy.sharded:  # the other ranks stream their shards meanwhile (rl/commands.py "contribute")
                broadcast_object({"op": "contribute"})
            await self.sync.push_model(self.policy.model, self.cfg.model, str(version))
        else:
            await self.servers.push(self.export(version), version)

    async def stop(self) -> None:
        """Stop whatever ``start`` started (in reverse order)."""
        if self.sync is not None:
            await self.sync.close()
        if self.servers is not None:
            await self.servers.close()
        if self.pool is not None:
            await asyncio.to_thread(self.pool.close)
        if self.stage_root is not None:
            shutil.rmtree(self.stage_root, ignore_errors=True)
        if self.judge is not None:
            await self.judge.__aexit__(None, None, None)
            if self._judge_pool is not None:
                await self._judge_pool.aclose()
