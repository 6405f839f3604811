"""Rollout servers of an RL run: the engine the agent talks to and how new weights reach it.

``rollout.engine=sglang``: the servers in ``rollout.servers`` (started by ``slurm/rl.sbatch``) are used
as they are. ``rollout.engine=dev``: the run starts ``klong-devserver`` subprocesses itself (one per
``rollout.devserver`` entry count, each on a free port) over the exported policy. Either way the
agent talks to them over HTTP with the same SGLang client, and ``push(path, version)`` runs SGLang's
disk update on every server (pause, ``/update_weights_from_disk``, continue, version check: ``rollout/sglang.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from klong_megatron.config.rollout import RolloutConfig
from klong_megatron.rollout.engine import WeightUpdate
from klong_megatron.rollout.sglang import SGLangEngine

_READY = "klong-devserver listening on "


class DevServerProcess:
    """One ``klong-devserver`` subprocess serving a HF model directory; ``url`` once it listens."""

    def __init__(self, model_dir: str | Path, *, threads: int = 1, seed: int = 0, startup_s: float = 120.0) -> None:
        cmd = [
            sys.executable, "-m", "klong_megatron.cli.devserver", "--model", str(model_dir),
            "--tokenizer", str(model_dir), "--port", "0", "--threads", str(threads), "--seed", str(seed),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1", "KLONG_PARENT_PID": str(os.getpid())},
        )
        self.log: list[str] = []
        self.url = self._wait_ready(startup_s)
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self, startup_s: float) -> str:
        deadline = time.monotonic() + startup_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            self.log.append(line.rstrip())
            if line.startswith(_READY):
                return line[len(_READY) :].strip()
        self.close()
        raise RuntimeError("klong-devserver did not start:\n" + "\n".join(self.log[-30:]))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log = (self.log + [line.rstrip()])[-200:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RolloutServers:
    """The engine of an RL run plus the dev-server processes it owns (none with SGLang)."""

    def __init__(self, cfg: RolloutConfig, model_dir: str | Path, *, num_dev_servers: int = 1) -> None:
        self.owned: list[DevServerProcess] = []
        if cfg.engine == "dev":
            self.owned = [
                DevServerProcess(model_dir, threads=max(1, cfg.devserver.threads), seed=cfg.devserver.seed + i)
                for i in range(num_dev_servers)
            ]
            urls = [p.url for p in self.owned]
        else:
            urls = list(cfg.servers)
        self.engine = SGLangEngine(
            urls,
            request_timeout_s=cfg.request_timeout_s,
            connect_timeout_s=cfg.connect_timeout_s,
            max_inflight=cfg.max_inflight_per_server,
            max_attempts=cfg.max_attempts,
            cooldown_s=cfg.server_cooldown_s,
            weight_timeout_s=cfg.weight_timeout_s,
            pause_mode=cfg.weight_pause_mode,
        )
        self.urls = urls

    async def wait_healthy(self, timeout_s: float = 600.0) -> None:
        """Wait until every server answers ``/health_generate`` (servers may still be loading)."""
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=10.0) as client:
            for url in self.urls:
                while True:
                    try:
                        if (await client.get(f"{url}/health_generate")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"rollout server {url} not healthy after {timeout_s:.0f} s")
                    await _sleep(2.0)

    async def push(self, path: str | Path, version: int) -> None:
        """Every server loads the weights in ``path`` (HF format) and tags generations with ``version``."""
        await self.engine.update_weights(WeightUpdate(str(version), path=str(Path(path).resolve())))

    async def close(self) -> None:
        await self.engine.close()
        for p in self.owned:
            p.close()


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
