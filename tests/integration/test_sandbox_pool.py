"""SandboxPool over both backends: pre-started sandboxes, fresh ones per use, dead ones replaced."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest
from sandbox_cases import BACKENDS, small_config

from klong_megatron.sandbox import SandboxError, make_sandbox
from klong_megatron.sandbox.pool import SandboxPool


def _kill_from_outside(sb) -> None:
    """Break a sandbox the way a crash would: container removed / work dir deleted."""
    if type(sb).__name__ == "DockerSandbox":
        import docker

        docker.from_env().containers.get(sb.name).remove(force=True)
    else:
        if os.path.ismount(sb.host_work):  # a size-limited work dir (workdir_mb) is a mounted disk image
            subprocess.run(["umount", "-l", str(sb.host_work)], check=True)
        shutil.rmtree(sb.host_work)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_hands_out_fresh_sandboxes_and_replaces_dead_ones(backend: str) -> None:
    with SandboxPool(small_config(backend), size=2) as pool:
        with pool.sandbox(timeout=60) as first:
            first.write_file("secret.txt", "from the previous task")
        with pool.sandbox(timeout=60) as a, pool.sandbox(timeout=60) as b:
            assert a is not first and b is not first
            for sb in (a, b):
                assert sb.exec("ls", timeout=10).stdout == ""  # no file of an earlier task
        deadline = time.monotonic() + 60
        while pool._ready.qsize() < 2 and time.monotonic() < deadline:  # replacements start in the background
            time.sleep(0.05)
        idle = list(pool._ready.queue)
        for sb in idle:
            _kill_from_outside(sb)
        healthy = pool.acquire(timeout=60)
        assert healthy not in idle and pool.replaced == 2
        assert healthy.exec("echo ok", timeout=10).stdout == "ok\n"
        pool.release(healthy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sandbox_is_closed_when_the_rollout_raises_and_pool_close_closes_all(backend: str) -> None:
    pool = SandboxPool(small_config(backend), size=2)
    pool.start()
    with pytest.raises(RuntimeError, match="rollout failed"), pool.sandbox(timeout=60) as sb:
        raise RuntimeError("rollout failed")
    with pytest.raises(Exception):  # noqa: B017 - the backend's own "not started" error
        sb.exec("true", timeout=5)
    held = pool.acquire(timeout=60)
    pool.close()
    with pytest.raises(Exception):  # noqa: B017
        held.exec("true", timeout=5)
    with pytest.raises(SandboxError, match="closed"):
        pool.acquire(timeout=1)


@pytest.mark.bwrap
def test_close_wakes_an_acquire_that_waits_for_a_sandbox() -> None:
    # A run stopped (SIGTERM) while a rollout waited for a sandbox in a worker thread: closing the pool must end
    # that wait, or the event loop's shutdown joins the thread forever.
    pool = SandboxPool(small_config("bwrap"), size=1)
    pool.start()
    held = pool.acquire(timeout=60)
    errors: list[BaseException] = []

    def wait_for_one() -> None:
        try:
            pool.acquire()
        except BaseException as e:  # noqa: BLE001 - what ended the wait is the result
            errors.append(e)

    waiter = threading.Thread(target=wait_for_one, daemon=True)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()  # the only sandbox is in use
    pool.close()
    waiter.join(timeout=10)
    assert not waiter.is_alive() and isinstance(errors[0], SandboxError) and "closed" in str(errors[0])
    with pytest.raises(SandboxError, match="closed"):
        pool.acquire(timeout=1)
    del held


def test_start_failures_are_retried_then_reported() -> None:
    attempts = []

    def factory(cfg):
        attempts.append(1)
        return make_sandbox(cfg)

    cfg = small_config("docker", image="klong-no-such-image:missing")
    pool = SandboxPool(cfg, size=1, factory=factory, start_attempts=2)
    with pytest.raises(SandboxError, match="after 2 attempts"):
        pool.start()
    pool.close()
    assert len(attempts) == 2
