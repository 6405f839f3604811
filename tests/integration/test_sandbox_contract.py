"""The Sandbox contract, run against both backends (real Docker containers, real bubblewrap)."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from sandbox_cases import BACKENDS, RUN_ID, RUNSC, small_config, started, wait_until_gone, wait_until_present

from klong_megatron.config import CONFIG_DIR, register_configs
from klong_megatron.sandbox import Sandbox, SandboxError, make_sandbox


@pytest.fixture(scope="module", params=[*BACKENDS, RUNSC])
def sb(request: pytest.FixtureRequest):
    box = started(request.param)
    yield box
    box.close()


def test_backend_satisfies_the_protocol(sb: Sandbox) -> None:
    assert isinstance(sb, Sandbox)


def test_exec_separates_stdout_stderr_and_exit_code(sb: Sandbox) -> None:
    res = sb.exec("echo out; echo err >&2; exit 7", timeout=10)
    assert (res.exit_code, res.stdout, res.stderr) == (7, "out\n", "err\n")
    assert not res.timed_out and not res.truncated and res.duration_s > 0


def test_fast_commands_never_lose_output(sb: Sandbox) -> None:
    results = [sb.exec(f"echo {i}; echo e{i} >&2", timeout=10) for i in range(40)]
    assert [(r.stdout, r.stderr) for r in results] == [(f"{i}\n", f"e{i}\n") for i in range(40)]


def test_exec_runs_in_workdir_by_default_and_honours_cwd_and_env(sb: Sandbox) -> None:
    assert sb.exec("pwd", timeout=10).stdout.strip() == "/workspace"
    sb.exec("mkdir -p sub/dir", timeout=10)
    res = sb.exec('pwd; echo "$GREETING"', timeout=10, cwd="sub/dir", env={"GREETING": "hello sandbox"})
    assert res.stdout.split("\n")[:2] == ["/workspace/sub/dir", "hello sandbox"]


def test_files_round_trip_between_host_api_and_commands(sb: Sandbox) -> None:
    blob = bytes(range(256)) * 4
    sb.write_file("data/blob.bin", blob)
    assert sb.read_file("/workspace/data/blob.bin") == blob
    assert sb.exec("wc -c < data/blob.bin", timeout=10).stdout.strip() == str(len(blob))
    sb.exec("printf 'made by a command' > made.txt", timeout=10)
    assert sb.read_file("made.txt") == b"made by a command"
    sb.write_file("made.txt", "overwritten\n")
    assert sb.exec("cat made.txt", timeout=10).stdout == "overwritten\n"


def test_write_file_outside_the_work_dir_is_refused_with_the_path(sb: Sandbox) -> None:
    for path in ("/etc/evil.conf", "../escape.txt", "/tmp/x.txt"):
        with pytest.raises(PermissionError, match="only under /workspace"):
            sb.write_file(path, "x")


def test_reading_a_missing_file_raises_file_not_found(sb: Sandbox) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        sb.read_file("nope.txt")


def test_binary_output_decodes_with_replacement_characters(sb: Sandbox) -> None:
    res = sb.exec(r"printf 'ok\377\376end'", timeout=10)
    assert res.exit_code == 0 and res.stdout.startswith("ok") and res.stdout.endswith("end")
    assert "\ufffd" in res.stdout


def test_large_output_keeps_head_and_tail_and_says_truncated(sb: Sandbox) -> None:
    res = sb.exec("echo FIRST; seq 1 200000; echo LAST", timeout=20)
    assert res.exit_code == 0 and res.truncated
    assert res.stdout.startswith("FIRST\n1\n") and res.stdout.rstrip().endswith("200000\nLAST")
    assert "bytes of output omitted" in res.stdout and len(res.stdout) < 70_000


def test_timeout_kills_the_command_and_the_sandbox_stays_usable(sb: Sandbox) -> None:
    sb.write_file("kept.txt", "still here")
    t0 = time.monotonic()
    res = sb.exec("echo started; sleep 60", timeout=1.5)
    assert time.monotonic() - t0 < 1.5 + 2
    assert res.timed_out and res.exit_code is None and res.stdout == "started\n"
    after = sb.exec("cat kept.txt", timeout=10)
    assert (after.exit_code, after.stdout) == (0, "still here")


def test_background_processes_do_not_outlive_the_command(sb: Sandbox) -> None:
    assert sb.exec("sleep 300 & echo spawned", timeout=10).stdout == "spawned\n"
    assert "sleep 300" not in sb.exec("ps -eo args", timeout=10).stdout


def test_export_copies_the_work_directory(sb: Sandbox, tmp_path: Path) -> None:
    sb.exec("mkdir -p out/nested && echo result > out/nested/r.txt", timeout=10)
    dest = sb.export(tmp_path / "graded")
    assert (dest / "out" / "nested" / "r.txt").read_text() == "result\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_removes_the_sandbox(backend: str) -> None:
    box = started(backend)
    box.write_file("x.txt", "x")
    box.close()
    if backend == "docker":
        import docker

        assert not docker.from_env().containers.list(all=True, filters={"name": box.name})
    else:
        assert not list(Path(box.cfg.host_dir or "/tmp").glob(box.name))  # type: ignore[attr-defined]
    box.close()  # idempotent


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_kills_a_command_running_in_another_thread(backend: str) -> None:
    box = started(backend)
    marker = f"sleep {5000 + os.getpid() % 1000}"
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(box.exec(f"{marker}; echo finished", timeout=120))
        except SandboxError as e:
            outcome.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    assert wait_until_present(marker), "the command never started"
    t0 = time.monotonic()
    box.close()
    worker.join(timeout=15)
    assert not worker.is_alive() and time.monotonic() - t0 < 15
    assert isinstance(outcome[0], SandboxError) and "closed while a command ran" in str(outcome[0])
    assert not wait_until_gone(marker)


@pytest.mark.parametrize("backend", BACKENDS)
def test_make_sandbox_builds_the_backend_of_the_hydra_preset(backend: str) -> None:
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=f"sandbox/{backend}", overrides=["sandbox.memory_mb=256", f"sandbox.run_id={RUN_ID}"])
    GlobalHydra.instance().clear()
    with make_sandbox(cfg.sandbox) as box:
        assert type(box).__name__.lower().startswith(backend)
        assert box.exec("python3 -c 'print(6*7)'", timeout=20).stdout == "42\n"


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="memory_mb"):
        small_config("docker", memory_mb=0)
    with pytest.raises(ValueError, match="network"):
        small_config("bwrap", network="bridge")
    with pytest.raises(ValueError, match=r"ro_binds\[0\]"):
        small_config("docker", ro_binds=["relative:/x"])
    with pytest.raises(ValueError, match="uid must be .* run_as_root"):
        small_config("docker", uid=0)
    with pytest.raises(ValueError, match="runtime and cap_add are Docker options"):
        small_config("bwrap", runtime="runsc")
    with pytest.raises(ValueError, match=r"cap_add\[0\]"):
        small_config("docker", cap_add=["ALL"])
    with pytest.raises(ValueError, match="pids must be >= 512 with runtime=runsc"):
        small_config("docker", runtime="runsc", pids=64)


@pytest.mark.docker
def test_docker_container_killed_from_outside_is_restarted_and_the_call_retried() -> None:
    import docker

    box = started("docker")
    try:
        box.write_file("kept.txt", "kept")
        docker.from_env().containers.get(box.name).kill()
        res = box.exec("cat kept.txt", timeout=10)
        assert (res.exit_code, res.stdout) == (0, "kept")
    finally:
        box.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ro_binds_are_readable_but_not_writable(backend: str) -> None:
    with tempfile.TemporaryDirectory(prefix="paper-") as d:  # world-readable parents: bwrap's uid must see it
        paper = Path(d)
        paper.chmod(0o755)
        (paper / "paper.md").write_text("# The paper")
        with started(backend, ro_binds=[f"{paper}:/home/paper"]) as box:
            assert box.read_file("/home/paper/paper.md") == b"# The paper"
            res = box.exec("echo edit >> /home/paper/paper.md", timeout=10)
            assert res.exit_code != 0 and ("Read-only file system" in res.stderr or "Permission denied" in res.stderr)
        assert (paper / "paper.md").read_text() == "# The paper"


@pytest.mark.parametrize("backend", BACKENDS)
def test_writable_root_when_read_only_root_is_off(backend: str) -> None:
    if backend == "docker":  # the image's directories belong to root; bwrap's root is its own scratch tmpfs
        with started(backend, read_only_root=False) as box:
            res = box.exec("touch /scratch", timeout=10)
            assert res.exit_code != 0 and "Permission denied" in res.stderr, res
    with started(backend, read_only_root=False, run_as_root=True) as box:
        res = box.exec("touch /scratch && ls /scratch && id -u", timeout=10)
        assert (res.exit_code, res.stdout) == (0, "/scratch\n0\n"), res
    assert not Path("/scratch").exists()
