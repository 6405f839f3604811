"""Docker engine list: config checks, least-loaded placement with caps, cool-down, client construction.

The engines themselves are exercised in tests/integration/test_sandbox_hosts.py (two local engines, one killed
mid-run; a TLS engine with certificates made at test time).
"""

from __future__ import annotations

import time

import pytest
from docker.transport.sshconn import SSHHTTPAdapter

from klong_megatron.config.sandbox import DockerHostConfig, SandboxConfig
from klong_megatron.sandbox._common import SandboxError
from klong_megatron.sandbox.docker_hosts import DockerHosts, EngineDown, hosts_for, is_engine_down, make_client


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"url": "http://node1:2375"}, "url"),
        ({"url": "unix://relative.sock"}, "url"),
        ({"url": "tcp://node1"}, "url"),
        ({"url": "tcp://node1:2376"}, "tls_dir"),  # plain TCP off loopback
        ({"url": "unix:///run/d.sock", "tls_dir": "/certs"}, "tls_dir"),
        ({"url": "ssh://u@node1", "capacity": 0}, "capacity"),
    ],
)
def test_bad_docker_host_names_the_field(over: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DockerHostConfig(**over)


def test_remote_engines_refuse_host_paths_and_duplicates() -> None:
    remote = DockerHostConfig(url="ssh://ops@node7")
    assert not remote.local and DockerHostConfig(url="tcp://127.0.0.1:2375").local
    with pytest.raises(ValueError, match=r"docker_hosts\[0\].*workdir_mb"):
        SandboxConfig(docker_hosts=[remote])
    with pytest.raises(ValueError, match=r"docker_hosts\[1\].*ro_binds"):
        SandboxConfig(docker_hosts=[DockerHostConfig(), remote], workdir_mb=None, ro_binds=["/a:/b"])
    with pytest.raises(ValueError, match="listed twice"):
        SandboxConfig(docker_hosts=[DockerHostConfig(), DockerHostConfig()])
    with pytest.raises(ValueError, match="backend=docker"):
        SandboxConfig(backend="bwrap", docker_hosts=[DockerHostConfig()])
    SandboxConfig(docker_hosts=[DockerHostConfig(), remote], workdir_mb=None)


def test_hydra_override_builds_the_host_list() -> None:
    from omegaconf import OmegaConf

    node = OmegaConf.merge(
        OmegaConf.structured(SandboxConfig),
        OmegaConf.from_dotlist(
            ["docker_hosts=[{url: 'unix:///a.sock', capacity: 3}, {url: 'tcp://127.0.0.1:2375'}]", "workdir_mb=null"]
        ),
    )
    cfg = OmegaConf.to_object(node)
    assert [(h.url, h.capacity) for h in cfg.docker_hosts] == [("unix:///a.sock", 3), ("tcp://127.0.0.1:2375", 64)]


def test_placement_is_least_loaded_relative_to_capacity() -> None:
    hosts = DockerHosts(
        [DockerHostConfig(url="unix:///a", capacity=2), DockerHostConfig(url="unix:///b", capacity=4)], 60
    )
    order = [hosts.place().url for _ in range(6)]
    # ties go to the listed order; b has twice a's room, so it gets twice its sandboxes
    assert order == ["unix:///a", "unix:///b", "unix:///b", "unix:///a", "unix:///b", "unix:///b"]
    with pytest.raises(SandboxError, match=r"unix:///a 2/2; unix:///b 4/4"):
        hosts.place()
    hosts.release(hosts.engines[0])
    assert hosts.place().url == "unix:///a"


def test_a_down_engine_takes_nothing_until_its_cooldown_ends() -> None:
    hosts = DockerHosts([DockerHostConfig(url="unix:///a"), DockerHostConfig(url="unix:///b")], cooldown_s=0.3)
    a, b = hosts.engines
    hosts.mark_down(a, "connection refused")
    hosts.mark_down(a, "again")  # idempotent while cooling down
    assert a.failures == 1 and "unix:///a 0/64 cooling down" in hosts.describe()
    assert [hosts.place().url for _ in range(3)] == ["unix:///b"] * 3
    hosts.mark_down(b, "gone too")
    with pytest.raises(SandboxError, match="cooling down"):
        hosts.place()
    time.sleep(0.35)
    assert hosts.place() is a  # tried again after the cool-down (b holds 3)


def test_hosts_for_shares_one_registry_per_host_list() -> None:
    cfg = SandboxConfig(docker_hosts=[DockerHostConfig(url="unix:///x")], host_cooldown_s=7)
    assert hosts_for(cfg) is hosts_for(
        SandboxConfig(docker_hosts=[DockerHostConfig(url="unix:///x")], host_cooldown_s=7)
    )
    assert hosts_for(cfg) is not hosts_for(SandboxConfig())
    assert [e.url for e in hosts_for(SandboxConfig(workdir_mb=None)).engines]  # DOCKER_HOST's engine


def test_ssh_engine_client_shells_out_to_ssh() -> None:
    # docker-py's ssh transport with use_ssh_client=True runs the `ssh` binary (no paramiko), like `docker -H ssh://`
    client = make_client(DockerHostConfig(url="ssh://ops@node7:2222"), version="1.41")
    adapter = client.api.get_adapter("http+docker://ssh")
    assert isinstance(adapter, SSHHTTPAdapter)
    assert adapter.ssh_host == "ops@node7:2222"  # ssh://ops@node7:2222 minus the scheme, as the transport parses it
    assert client.api.base_url == "http+docker://ssh"


def test_tls_dir_must_hold_the_three_pem_files(tmp_path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(SandboxError, match="has no cert.pem"):
        make_client(DockerHostConfig(url="tcp://node1:2376", tls_dir=str(tmp_path)), version="1.41")


def test_unreachable_engine_is_engine_down(tmp_path) -> None:
    with pytest.raises(EngineDown, match="cannot reach the Docker engine unix://"):
        make_client(DockerHostConfig(url=f"unix://{tmp_path}/nothing.sock"))
    assert is_engine_down(ConnectionRefusedError()) and not is_engine_down(ValueError())
