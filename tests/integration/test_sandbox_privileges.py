"""Least privilege and hostile commands on every backend (Docker, bubblewrap, Docker under gVisor's runsc).

Each attack ends within timeout + 2 s, the result says what happened, the host is unaffected, and the last
test checks that nothing of this file is left (containers, processes, work dir mounts and images).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from sandbox_cases import (
    BACKENDS,
    DISKS,
    RUN_ID,
    RUNSC,
    host_processes_with,
    resource_ok,
    small_config,
    started,
    wait_until_gone,
)

from klong_megatron.sandbox import SandboxError, make_sandbox
from klong_megatron.sandbox.base import ExecResult, Sandbox

GRACE_S = 2.0
ALL = [*BACKENDS, RUNSC]
NEEDS_DISKS = pytest.mark.skipif(not DISKS, reason="work dir disks (workdir_mb) need root on the host")


def timed(sb: Sandbox, cmd: str, timeout: float = 10.0) -> ExecResult:
    t0 = time.monotonic()
    res = sb.exec(cmd, timeout=timeout)
    assert time.monotonic() - t0 < timeout + GRACE_S, f"{cmd!r} took {time.monotonic() - t0:.1f}s"
    return res


def py(code: str) -> str:
    return f"python3 -c '{code}'"


def gvisor(sb: Sandbox) -> bool:
    return getattr(sb.cfg, "runtime", None) == "runsc"  # type: ignore[attr-defined]


def put_setuid_root_copy(sb: Sandbox, src: str, name: str) -> None:
    """Place a root-owned, mode 4755 copy of the sandbox's ``src`` in its work dir (as only the host can)."""
    data = sb.read_file(src)
    if type(sb).__name__ == "DockerSandbox":
        import docker

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), 0o4755, 0, 0
            tar.addfile(info, io.BytesIO(data))
        docker.from_env().api.put_archive(sb.name, sb.cfg.workdir, buf.getvalue())  # type: ignore[attr-defined]
    else:
        target = Path(sb.host_work) / name  # type: ignore[attr-defined]
        target.write_bytes(data)
        os.chown(target, 0, 0)
        os.chmod(target, 0o4755)


@pytest.fixture(scope="class", params=ALL)
def sb(request: pytest.FixtureRequest):
    box = started(request.param, nofile=256)
    yield box
    box.close()


class TestLeastPrivilege:
    def test_commands_run_as_non_root_without_capabilities_and_with_no_new_privileges(self, sb: Sandbox) -> None:
        nnp = py("import ctypes; print(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))")  # PR_GET_NO_NEW_PRIVS
        res = timed(sb, f"id -u; id -g; grep CapEff /proc/self/status; {nnp}")
        uid, gid, capeff, no_new_privs = res.stdout.split("\n")[:4]
        assert (uid, gid, no_new_privs) == ("1000", "1000", "1"), res
        assert capeff.split() == ["CapEff:", "0000000000000000"]

    def test_raw_sockets_are_refused(self, sb: Sandbox) -> None:
        res = timed(sb, py("import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)"))
        assert res.exit_code != 0 and "PermissionError" in res.stderr and "not permitted" in res.stderr, res

    def test_a_setuid_root_binary_cannot_raise_privileges(self, sb: Sandbox) -> None:
        if os.geteuid() != 0:
            pytest.skip("only root on the host can plant a root-owned setuid file")
        put_setuid_root_copy(sb, "/usr/bin/id", "suid-id")
        res = timed(sb, "./suid-id; su -c id root </dev/null")
        assert res.stdout.startswith("uid=1000") and "euid" not in res.stdout, res  # "euid=0" had it worked
        assert res.exit_code != 0 and "su: " in res.stderr  # the system's setuid su cannot become root either

    def test_unshare_r_gives_no_root(self, sb: Sandbox) -> None:
        res = timed(sb, "unshare -r sh -c 'id -u; touch /etc/owned'")
        if gvisor(sb):  # gVisor implements user namespaces in its own user-space kernel: root there owns nothing
            assert res.stdout == "0\n" and "Permission denied" in res.stderr, res
        else:
            assert res.exit_code != 0 and "unshare failed" in res.stderr and not res.stdout, res

    def test_mount_is_refused(self, sb: Sandbox) -> None:
        res = timed(sb, "mount -t tmpfs none /tmp; mount --bind /workspace /tmp")
        assert res.exit_code != 0 and "mount" in res.stderr, res

    def test_ptrace_of_pid_1_is_refused(self, sb: Sandbox) -> None:
        code = "import ctypes; l = ctypes.CDLL(None, use_errno=True); print(l.ptrace(16, 1, 0, 0), ctypes.get_errno())"
        res = timed(sb, py(code))  # PTRACE_ATTACH = 16
        assert res.stdout == "-1 1\n", res  # EPERM

    def test_writes_to_proc_sys_are_refused(self, sb: Sandbox) -> None:
        before = Path("/proc/sys/kernel/panic").read_text()
        res = timed(sb, f"echo {before.strip()} > /proc/sys/kernel/panic; echo 1 > /proc/sys/vm/drop_caches")
        assert res.exit_code != 0 and ("Read-only file system" in res.stderr or "Permission denied" in res.stderr)
        assert Path("/proc/sys/kernel/panic").read_text() == before


class TestExhaustion:
    @NEEDS_DISKS
    def test_filling_the_work_dir_says_no_space_left_and_spares_the_host(self, sb: Sandbox) -> None:
        host_free = shutil.disk_usage(tempfile.gettempdir()).free
        res = timed(sb, "dd if=/dev/zero of=fill bs=4k count=51200 status=none", timeout=20)  # to the last block
        assert res.exit_code != 0 and "No space left on device" in res.stderr, res
        assert host_free - shutil.disk_usage(tempfile.gettempdir()).free < 100 * 2**20  # the 64 MiB disk at most
        with pytest.raises(OSError, match="(?i)no space left on device"):  # the write_file tool reports it
            sb.write_file("more.txt", "x" * 100_000)
        assert timed(sb, "rm fill && echo ok > after.txt && cat after.txt").stdout == "ok\n"

    def test_filling_tmp_says_no_space_left(self, sb: Sandbox) -> None:
        res = timed(sb, "dd if=/dev/zero of=/tmp/fill bs=1M count=200 status=none; rm -f /tmp/fill", timeout=20)
        assert "No space left on device" in res.stderr, res

    @NEEDS_DISKS
    def test_inode_exhaustion_of_the_work_dir_says_no_space_left(self, sb: Sandbox) -> None:
        code = (
            'import os\nos.mkdir("many")\ni = 0\ntry:\n    while True:\n        open(f"many/{i}", "w").close()\n'
            "        i += 1\nexcept OSError as e:\n    print(i, e.strerror)"
        )
        sb.write_file("inodes.py", code)
        res = timed(sb, "python3 inodes.py", timeout=30)
        count, _, why = res.stdout.strip().partition(" ")
        assert why == "No space left on device" and 3000 < int(count) < 4096, res  # 64 MiB: 4096 inodes
        assert timed(sb, "rm -r many inodes.py && echo ok", timeout=20).stdout == "ok\n"

    def test_inode_exhaustion_of_tmp_fails_or_times_out(self, sb: Sandbox) -> None:
        res = timed(sb, 'i=0; while : > /tmp/f$i; do i=$((i+1)); done; echo "stopped at $i"', timeout=8)
        assert res.timed_out or "No space left on device" in res.stderr, res
        assert timed(sb, "rm -f /tmp/f*; echo ok", timeout=20).stdout == "ok\n"

    def test_file_descriptor_exhaustion_says_too_many_open_files(self, sb: Sandbox) -> None:
        code = (
            'fs = []\ntry:\n    while True:\n        fs.append(open("/dev/null"))\n'
            "except OSError as e:\n    print(len(fs), e.strerror)"
        )
        sb.write_file("fds.py", code)
        res = timed(sb, "python3 fds.py")
        count, _, why = res.stdout.strip().partition(" ")
        assert why == "Too many open files" and 200 < int(count) <= 256, res  # nofile=256

    def test_a_process_ignoring_sigterm_is_killed_at_the_timeout(self, sb: Sandbox) -> None:
        code = (
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(4242)"
        )
        res = timed(sb, f"trap '' TERM INT HUP; {py(code)}", timeout=2)
        assert res.timed_out and res.exit_code is None and res.stdout == "1\n", res
        assert not wait_until_gone("time.sleep(4242)")

    def test_children_that_outlive_their_command_are_killed(self, sb: Sandbox) -> None:
        cmd = "nohup sleep 4343 >/dev/null 2>&1 & ( (sleep 4344 </dev/null >/dev/null 2>&1 &) & ); disown -a; echo gone"
        assert timed(sb, cmd).stdout == "gone\n"
        assert not wait_until_gone("sleep 434")
        assert "sleep 434" not in timed(sb, "ps -eo args").stdout


@pytest.mark.docker
def test_run_as_root_is_an_explicit_opt_in_with_only_the_documented_capabilities() -> None:
    with started("docker", run_as_root=True) as box:
        res = box.exec(
            "id -u; grep CapEff /proc/self/status; chown 1234 /workspace && stat -c %u /workspace", timeout=10
        )
        uid, capeff, owner = res.stdout.split("\n")[:3]
        assert (uid, owner) == ("0", "1234"), res
        assert int(capeff.split()[1], 16) == 0xFB  # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID
        raw = box.exec(py("import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)"), timeout=10)
        assert raw.exit_code != 0 and "PermissionError" in raw.stderr  # NET_RAW is not among them


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_a_disk_the_work_dir_is_still_owned_by_the_command_user(backend: str) -> None:
    with started(backend, workdir_mb=None) as box:  # Docker: a named volume chowned by a CAP_CHOWN-only container
        res = box.exec("stat -c '%u %g' . && echo x > f && stat -c %u f && df --output=target . | tail -1", timeout=10)
        assert res.stdout.split("\n")[:3] == ["1000 1000", "1000", "/workspace"], res
        box.write_file("g.txt", "g")
        assert box.exec("echo more >> g.txt && stat -c %u g.txt", timeout=10).stdout == "1000\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ro_bind_the_sandbox_user_cannot_read_is_refused_at_start_naming_it(backend: str) -> None:
    if backend == "bwrap" and os.geteuid() != 0:
        pytest.skip("without root bwrap runs as the caller, who can read the caller's files")
    with tempfile.TemporaryDirectory(prefix="private-") as d:  # mode 0700
        box = make_sandbox(small_config(backend, ro_binds=[f"{d}:/home/paper"]))
        with pytest.raises(SandboxError, match=rf"ro_binds\[0\]: {d} is not readable .* chmod o\+rX"):
            box.start()
        box.close()


def test_nothing_of_this_file_remains() -> None:
    """Runs last: every sandbox above was closed; no container, process, mount or disk image is left."""
    if resource_ok("docker"):
        import docker

        left = docker.from_env().containers.list(all=True, filters={"label": f"klong.run={RUN_ID}"})
        assert not left, [c.name for c in left]
    marker = f"klong-sbx-{os.getpid()}-"
    assert not host_processes_with(marker)
    assert marker not in Path("/proc/mounts").read_text()
    assert not list(Path(tempfile.gettempdir()).glob(f"{marker}*"))
