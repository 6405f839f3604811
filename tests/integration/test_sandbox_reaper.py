"""Nothing outlives its owner: exit hooks and the reapers clean up after crashed processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sandbox_cases import DISKS, RUN_ID

from klong_megatron.sandbox._common import reap_dead_dirs

CHILD = textwrap.dedent(
    """
    import os, sys
    from klong_megatron.config.sandbox import SandboxConfig
    from klong_megatron.sandbox import make_sandbox
    sb = make_sandbox(SandboxConfig(backend=sys.argv[1], memory_mb=128, run_id=sys.argv[2]))
    sb.start()
    sb.write_file("progress.txt", "half done")
    print(sb.name, getattr(sb, "host_work", "") or getattr(sb._disk, "mount_dir", ""), flush=True)
    if sys.argv[3] == "crash":
        os.kill(os.getpid(), 9)  # no atexit, no finally: like an OOM-killed trainer
    """
)


def _child(backend: str, how: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, backend, f"{RUN_ID}-child", how], capture_output=True, text=True, timeout=120
    )
    return out.stdout.split()


def _containers(name: str) -> list[str]:
    import docker

    return [c.name for c in docker.from_env().containers.list(all=True, filters={"name": name})]


@pytest.mark.docker
def test_docker_exit_hook_removes_containers_the_process_forgot_to_close() -> None:
    name, *disk = _child("docker", "exit")
    assert _containers(name) == [] and all(_disk_gone(d) for d in disk)


@pytest.mark.docker
def test_docker_reaper_removes_containers_of_a_crashed_process() -> None:
    from klong_megatron.sandbox.docker import reap_leftovers

    name, *disk = _child("docker", "crash")
    assert _containers(name) == [name]
    assert name in reap_leftovers(run_id=f"{RUN_ID}-child")
    assert _containers(name) == []
    if DISKS:  # the work dir disk of the dead process: unmounted, image and mount point removed
        assert disk[0] in reap_dead_dirs() and _disk_gone(disk[0])


@pytest.mark.bwrap
def test_bwrap_exit_hook_removes_work_dirs_the_process_forgot_to_close() -> None:
    name, host_work = _child("bwrap", "exit")
    assert not Path(host_work).exists()


@pytest.mark.bwrap
def test_bwrap_reaper_removes_work_dirs_of_a_crashed_process() -> None:
    from klong_megatron.sandbox.bwrap import reap_leftovers

    name, host_work = _child("bwrap", "crash")
    assert (Path(host_work) / "progress.txt").exists()
    assert host_work in reap_leftovers()
    assert not Path(host_work).exists() and _disk_gone(host_work)


def _disk_gone(mount_dir: str) -> bool:
    return f" {mount_dir} " not in Path("/proc/mounts").read_text() and not Path(mount_dir + ".img").exists()
