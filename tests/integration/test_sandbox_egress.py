"""The egress proxy and the in-sandbox forwarder on the host (no sandbox): what is forwarded, rewritten,
refused and recorded; plus the allow-list config checks. Real sockets and a real HTTP server throughout."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sandbox_cases import HostHttpServer

from klong_megatron.config.sandbox import SandboxConfig
from klong_megatron.sandbox.egress import FORWARDER, AllowList, EgressProxy


@pytest.fixture
def upstream():
    server = HostHttpServer("upstream")
    yield server
    server.close()


@pytest.fixture
def echo_port():
    """A raw TCP echo server (stands in for any TLS endpoint behind CONNECT)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data[::-1])

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture
def proxy(tmp_path: Path, upstream: HostHttpServer, echo_port: int):
    p = EgressProxy([f"127.0.0.1:{upstream.port}", f"127.0.0.1:{echo_port}"], tmp_path / "net", "test")
    p.start()
    yield p
    p.close()


def ask(proxy: EgressProxy, raw: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(proxy.socket_path))
        s.sendall(raw)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_absolute_http_request_is_forwarded_in_origin_form(proxy: EgressProxy, upstream: HostHttpServer) -> None:
    head = (
        f"GET {upstream.url('/a/b?q=1')} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
        "Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\nX-Kept: yes\r\n\r\n"
    )
    reply = ask(proxy, head.encode())
    assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"served by upstream")
    method, path, headers = upstream.hits[-1]
    assert (method, path, headers["X-Kept"], headers["Connection"]) == ("GET", "/a/b?q=1", "yes", "close")
    assert not any(h.lower().startswith("proxy-") for h in headers)
    assert proxy.forwarded == 1 and proxy.refusals == []


def test_request_body_is_relayed(proxy: EgressProxy, upstream: HostHttpServer) -> None:
    body = b"x" * 200_000
    head = f"POST {upstream.url('/up')} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    reply = ask(proxy, head + body)
    method, path, headers = upstream.hits[-1]
    assert reply.endswith(body) and (method, path) == ("POST", "/up")
    assert headers["Host"] == f"127.0.0.1:{upstream.port}"  # added: the client sent none


def test_connect_opens_a_tunnel_both_ways(proxy: EgressProxy, echo_port: int) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(proxy.socket_path))
        s.sendall(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(100) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        s.sendall(b"tls bytes")
        assert s.recv(100) == b"setyb slt"


def test_unlisted_target_gets_403_naming_it_and_is_recorded(proxy: EgressProxy, upstream: HostHttpServer) -> None:
    reply = ask(proxy, b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n").decode()
    assert reply.startswith("HTTP/1.1 403 Forbidden") and "pypi.org:443 is not on this sandbox's allow-list" in reply
    reply = ask(proxy, b"GET http://example.com/ HTTP/1.1\r\n\r\n").decode()
    assert reply.startswith("HTTP/1.1 403") and "example.com:80" in reply
    assert [(r.host, r.port, r.method) for r in proxy.refusals] == [
        ("pypi.org", 443, "CONNECT"),
        ("example.com", 80, "GET"),
    ]
    assert proxy.forwarded == 0 and upstream.hits == []


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n", "absolute http:// URL"),
        (b"CONNECT nohostport HTTP/1.1\r\n\r\n", "CONNECT needs host:port"),
        (b"hello there\r\n\r\n", "bad proxy request"),
    ],
)
def test_malformed_requests_get_400_and_are_recorded(proxy: EgressProxy, raw: bytes, why: str) -> None:
    reply = ask(proxy, raw).decode()
    assert reply.startswith("HTTP/1.1 400") and why in reply
    assert proxy.refusals[-1].reason.startswith("bad request")


def test_oversized_request_head_gets_431(proxy: EgressProxy) -> None:
    reply = ask(proxy, b"GET http://127.0.0.1/ HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431")


def test_allowed_target_that_is_down_gets_502(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # bound, never listening: connections are refused
        p = EgressProxy([f"127.0.0.1:{dead_port}"], tmp_path / "net")
        p.start()
        try:
            reply = ask(p, f"GET http://127.0.0.1:{dead_port}/ HTTP/1.1\r\n\r\n".encode()).decode()
        finally:
            p.close()
    assert reply.startswith("HTTP/1.1 502") and f"cannot connect to 127.0.0.1:{dead_port}" in reply


def test_close_cuts_open_tunnels_and_removes_the_directory(proxy: EgressProxy, echo_port: int) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(proxy.socket_path))
    s.sendall(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\n\r\n".encode())
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    proxy.close()
    assert s.recv(100) == b"" and not proxy.net_dir.exists()
    s.close()


def test_allow_list_matching_rules() -> None:
    allow = AllowList(["Mirror.Example.org", "*.debian.org", "pypi-cache:3141", "[::1]:8080"])
    assert allow.permits("mirror.example.org", 443) and allow.permits("MIRROR.example.org.", 80)
    assert not allow.permits("mirror.example.org", 8080)  # no port listed: web ports only
    assert allow.permits("deb.debian.org", 80) and not allow.permits("debian.org", 80)
    assert not allow.permits("evil-debian.org", 80)
    assert allow.permits("pypi-cache", 3141) and not allow.permits("pypi-cache", 443)
    assert allow.permits("::1", 8080) and not allow.permits("127.0.0.1", 8080)


def test_forwarder_runs_the_command_and_returns_its_status(tmp_path: Path) -> None:
    run = [sys.executable, "-I", "-S", str(FORWARDER), "0", str(tmp_path / "none.sock"), "--"]
    assert subprocess.run([*run, "sh", "-c", "echo hi; exit 3"], capture_output=True, timeout=30).returncode == 3
    assert subprocess.run([*run, "sh", "-c", "kill -9 $$"], timeout=30).returncode == 128 + 9
    bad = subprocess.run([*run[:-1], "--what"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_allowlist_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"allow\[1\]: .*no scheme"):
        SandboxConfig(network="allowlist", allow=["ok.org", "https://pypi.org/simple"])
    with pytest.raises(ValueError, match=r"allow\[0\]: port"):
        SandboxConfig(network="allowlist", allow=["host:99999"])
    with pytest.raises(ValueError, match="allow must list at least one"):
        SandboxConfig(network="allowlist")
    with pytest.raises(ValueError, match="allow needs network=allowlist"):
        SandboxConfig(network="none", allow=["pypi.org"])
    with pytest.raises(ValueError, match="pip_index_url: expected an http"):
        SandboxConfig(network="allowlist", pip_index_url="ftp://mirror/simple")
    cfg = SandboxConfig(backend="bwrap", network="allowlist", pip_index_url="https://mirror.local/simple")
    assert cfg.allow_rules == ["mirror.local:443"]
