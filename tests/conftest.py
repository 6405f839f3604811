"""Shared fixtures and resource markers.

``docker``, ``slurm`` and ``gpu`` tests skip only when the resource is truly absent, printing why.
With ``KLONG_REQUIRE_SERVICES=1`` (set by .ci/run) a missing docker engine, bubblewrap or Slurm is a
failure instead of a skip, so CI cannot go green without running them.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


def _ok(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.cache
def resource_missing(name: str) -> str | None:
    """Why resource ``name`` is unavailable, or None when it is usable."""
    if name == "docker":
        if not shutil.which("docker"):
            return "docker CLI not installed (run `make services`)"
        return None if _ok(["docker", "info"]) else "docker engine not running (run `make services`)"
    if name == "slurm":
        if not shutil.which("sinfo"):
            return "Slurm not installed (run `make services`)"
        return None if _ok(["sinfo", "-h"]) else "slurmctld not reachable (run `make services`)"
    if name == "bwrap":
        if not shutil.which("bwrap"):
            return "bubblewrap not installed (run `make services`)"
        return (
            None if _ok(["bwrap", "--unshare-all", "--ro-bind", "/", "/", "true"]) else "bwrap cannot create namespaces"
        )
    if name == "browser":
        return None if chromium() else "chromium not installed (run `make services`)"
    if name == "gpu":
        import torch

        return None if torch.cuda.is_available() else "no CUDA device"
    raise KeyError(name)


def chromium() -> str | None:
    """Path of a headless-capable Chromium (Debian's ``chromium`` package), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@functools.cache
def clear_local_slurm_queue() -> None:
    """Cancel every job left on the local test cluster (ClusterName=klong) by an earlier, killed test run.

    One job stuck in that one-node queue would keep every later test job pending. A real cluster
    (another ClusterName) is never touched.
    """
    conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20).stdout
    if not any(line.split() == ["ClusterName", "=", "klong"] for line in conf.splitlines()):
        return
    jobs = subprocess.run(["squeue", "-h", "-o", "%A %T %j"], capture_output=True, text=True, timeout=20).stdout
    if jobs.strip():
        print(f"\nlocal Slurm: cancelling jobs left by an earlier run:\n{jobs}")
        subprocess.run(["scancel", "--full", *(line.split()[0] for line in jobs.splitlines())], timeout=30)


def pytest_runtest_setup(item: pytest.Item) -> None:
    required = os.environ.get("KLONG_REQUIRE_SERVICES") == "1"
    for name in ("docker", "slurm", "bwrap", "browser", "gpu"):
        if name in item.keywords and (why := resource_missing(name)) is not None:
            if required and name != "gpu":
                pytest.fail(f"{name} is required here (KLONG_REQUIRE_SERVICES=1) but {why}")
            pytest.skip(f"{name}: {why}")
    if "slurm" in item.keywords:
        clear_local_slurm_queue()


@pytest.fixture
def chromium_bin() -> str:
    """Headless Chromium for page tests (mark the test ``browser``)."""
    path = chromium()
    assert path is not None, "mark the test with @pytest.mark.browser"
    return path


@pytest.fixture
def hydra_configs():
    """Hydra initialised on hydra_configs/ with every schema registered (compose() works inside)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from klong_megatron.config import CONFIG_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()
