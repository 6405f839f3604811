"""Sandboxes on several Docker engines: balanced placement, an engine killed mid-run, a TLS engine.

Two real local engines on different sockets (``tools/docker_engine.sh start`` and ``... second``); the second
is SIGKILLed while a rollout of the real ``RolloutManager`` runs commands in a sandbox on it: that rollout is
retried from scratch on the first engine, the second cools down, and nothing lands there afterwards. The
second engine is restarted (and our containers on it removed) at the end. The TLS test starts a third,
throw-away dockerd on loopback TCP with ``--tlsverify`` and certificates made here with ``openssl``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import docker
import pytest
from sandbox_cases import RUN_ID, small_config

from klong_megatron.config.sandbox import DockerHostConfig
from klong_megatron.data.trajectory import Message, Trajectory
from klong_megatron.rollout.manager import RolloutManager, RolloutTask
from klong_megatron.rollout.store import TrajectoryStore
from klong_megatron.sandbox.docker_hosts import EngineDown, hosts_for, make_client
from klong_megatron.sandbox.pool import SandboxPool

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[2]
SECOND_DIR = Path(os.environ.get("SECOND_DIR", "/var/lib/klong-dockerd2"))  # tools/docker_engine.sh's default
FIRST_URL = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
SECOND_URL = f"unix://{SECOND_DIR}/docker.sock"


def _second_engine() -> docker.DockerClient:
    try:
        client = docker.DockerClient(base_url=SECOND_URL, timeout=30)
        client.ping()
    except Exception as e:  # not started on this machine
        why = f"no second Docker engine at {SECOND_URL} ({e}); run `bash tools/docker_engine.sh second`"
        if os.environ.get("KLONG_REQUIRE_SERVICES") == "1":  # CI (.ci/run): tools/services.sh starts it
            pytest.fail(why)
        pytest.skip(why)
    return client


def _restart_second_engine() -> None:
    subprocess.run(["bash", str(ROOT / "tools/docker_engine.sh"), "second"], check=True, capture_output=True)
    client = docker.DockerClient(base_url=SECOND_URL, timeout=60)
    for c in client.containers.list(all=True, filters={"label": f"klong.run={RUN_ID}"}):
        c.remove(force=True, v=True)


def test_engine_killed_mid_run_its_rollout_is_retried_on_the_other_engine(tmp_path: Path) -> None:
    _second_engine()
    cfg = small_config(
        "docker",
        docker_hosts=[DockerHostConfig(url=FIRST_URL, capacity=2), DockerHostConfig(url=SECOND_URL, capacity=2)],
        host_cooldown_s=600,
    )
    hosts = hosts_for(cfg)
    pid = int((SECOND_DIR / "dockerd.pid").read_text())
    placed: list[tuple[str, str, bool]] = []  # (rollout id, engine, placed after the kill)
    killed = threading.Event()

    def work(sb, task_id: str) -> Trajectory:
        placed.append((task_id, sb.engine.url, killed.is_set()))
        for i in range(4):
            res = sb.exec(f"echo {i} >> log.txt && sleep 0.2", timeout=30)
            assert res.exit_code == 0, res.stderr
            if i == 1 and sb.engine.url == SECOND_URL and not killed.is_set():
                os.kill(pid, signal.SIGKILL)  # the engine dies under a running rollout
                killed.set()
        log = sb.read_file("log.txt").decode()
        return Trajectory(id=task_id, messages=[Message(role="assistant", content=log)], meta={"engine": sb.engine.url})

    pool = SandboxPool(cfg, size=2)
    try:
        pool.start()

        async def rollout(task: RolloutTask) -> Trajectory:
            sb = await asyncio.to_thread(pool.acquire, 60)
            try:
                return await asyncio.to_thread(work, sb, task.id)
            finally:
                await asyncio.to_thread(pool.release, sb)

        store = TrajectoryStore(tmp_path / "rollouts.jsonl")
        manager = RolloutManager(rollout, store, concurrency=2, max_retries=2, progress=False)
        tasks = [RolloutTask(task_id=f"t{i}", messages=[]) for i in range(4)]
        stats = asyncio.run(manager.run(tasks))
    finally:
        pool.close()
        if killed.is_set():
            _restart_second_engine()

    assert killed.is_set(), f"no rollout was placed on the second engine: {placed}"
    assert stats.finished == 4 and stats.failed == 0 and stats.retries >= 1, stats.errors
    first_two = sorted(url for _, url, _ in placed[:2])
    assert first_two == sorted([FIRST_URL, SECOND_URL])  # least loaded: one sandbox on each engine
    assert all(url == FIRST_URL for _, url, after in placed if after), placed  # nothing placed on the dead one
    hit = [tid for tid, url, after in placed if url == SECOND_URL and not after]
    assert any((tid, FIRST_URL, True) in placed for tid in hit)  # the killed rollout ran again elsewhere
    lines = store.path.read_text().splitlines()
    stored = {d["id"]: d for d in map(json.loads, lines)}
    assert len(lines) == 4  # none stored twice
    assert sorted(stored) == ["t0/0", "t1/0", "t2/0", "t3/0"]
    assert all(d["messages"][0]["content"] == "0\n1\n2\n3\n" for d in stored.values())  # each from a fresh start
    assert "cooling down" in hosts.describe() and hosts.engines[1].failures == 1
    assert [e.load for e in hosts.engines] == [0, 0]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certs(d: Path, name: str, ca_name: str = "ca") -> Path:
    """A CA (once per ``ca_name``), a server cert for 127.0.0.1 and a client cert; Docker's file names."""
    d.mkdir(exist_ok=True)
    if not (d / f"{ca_name}.pem").exists():
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={ca_name}",
                 "-keyout", f"{ca_name}-key.pem", "-out", f"{ca_name}.pem", cwd=d)  # fmt: skip
    for who, ext in ((f"{name}-server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                     (f"{name}-client", "extendedKeyUsage=clientAuth")):  # fmt: skip
        (d / f"{who}.ext").write_text(ext + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout", f"{who}-key.pem",
                 "-out", f"{who}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", f"{ca_name}.pem", "-CAkey", f"{ca_name}-key.pem",
                 "-CAcreateserial", "-days", "1", "-out", f"{who}.pem", "-extfile", f"{who}.ext", cwd=d)  # fmt: skip
    client_dir = d / f"{name}-client-dir"
    client_dir.mkdir()
    (client_dir / "ca.pem").write_bytes((d / f"{ca_name}.pem").read_bytes())
    (client_dir / "cert.pem").write_bytes((d / f"{name}-client.pem").read_bytes())
    (client_dir / "key.pem").write_bytes((d / f"{name}-client-key.pem").read_bytes())
    return client_dir


def test_tls_engine_accepts_our_client_cert_and_refuses_others(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("starting a throw-away dockerd needs root")
    pki = tmp_path / "pki"
    ours = _certs(pki, "a")
    stranger = _certs(pki, "b", ca_name="other-ca")  # client cert signed by a CA the engine does not trust
    (stranger / "ca.pem").write_bytes((pki / "ca.pem").read_bytes())  # ... while it trusts the engine's cert
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    state = Path(f"/run/klong-tls-{os.getpid()}")  # short: containerd's socket path must fit 108 bytes
    state.mkdir(parents=True, exist_ok=True)
    cmd = ["dockerd", "--bridge=none", "--iptables=false", "--tlsverify", f"--tlscacert={pki / 'ca.pem'}",
           f"--tlscert={pki / 'a-server.pem'}", f"--tlskey={pki / 'a-server-key.pem'}", "-H", url,
           f"--data-root={tmp_path / 'data'}", f"--exec-root={state}", f"--pidfile={state / 'pid'}"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(tmp_path / "dockerd.log").open("w"))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = make_client(DockerHostConfig(url=url, tls_dir=str(ours)))
                break
            except EngineDown:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError((tmp_path / "dockerd.log").read_text()[-2000:]) from None
                time.sleep(0.2)
        assert client.api.base_url == f"https://127.0.0.1:{port}" and client.ping()
        assert client.version()["ApiVersion"]
        with pytest.raises(EngineDown, match="cannot reach"):  # client cert of an untrusted CA: handshake fails
            make_client(DockerHostConfig(url=url, tls_dir=str(stranger)))
        with pytest.raises(EngineDown):  # plain HTTP to a TLS port (allowed on loopback, refused by the engine)
            make_client(DockerHostConfig(url=url))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        subprocess.run(["rm", "-rf", str(state)], check=False)
