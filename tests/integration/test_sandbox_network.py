"""Network modes end to end, on both backends: ``allowlist`` lets HTTP(S) reach only listed hosts through the
egress proxy (refusals recorded), direct connections have no route, ``none`` reaches nothing.

Real servers on the host's loopback play the package mirror (A), a forbidden site on the same host (B) and a
pip index (C). The sandbox's ``no_proxy`` normally keeps 127.0.0.1 direct (it is the sandbox's own loopback),
so requests to the host servers clear it to go through the proxy, as a request to a mirror's name would.
"""

from __future__ import annotations

import pytest
from sandbox_cases import BACKENDS, RUNSC, HostHttpServer, started

from klong_megatron.sandbox.base import Sandbox

# fetch.py URL [--direct] [--retry] [--post DATA]: prints "OK <status> <body>" or "ERR <exception>".
FETCH = """
import sys, time, urllib.request
url, args = sys.argv[1], sys.argv[2:]
handlers = [urllib.request.ProxyHandler({})] if "--direct" in args else []
data = args[args.index("--post") + 1].encode() if "--post" in args else None
deadline = time.time() + (5 if "--retry" in args else 0)
while True:
    try:
        with urllib.request.build_opener(*handlers).open(url, data=data, timeout=5) as r:
            print("OK", r.status, r.read().decode())
        break
    except Exception as e:
        if time.time() > deadline:
            print("ERR", type(e).__name__, e)
            break
        time.sleep(0.1)
"""
VIA_PROXY = {"no_proxy": "", "NO_PROXY": ""}  # send the host's 127.0.0.1 through the proxy


@pytest.fixture(scope="module")
def servers():
    a, b, c = HostHttpServer("A"), HostHttpServer("B"), HostHttpServer("C")
    yield a, b, c
    for s in (a, b, c):
        s.close()


@pytest.fixture(scope="module", params=[*BACKENDS, RUNSC])
def box(request: pytest.FixtureRequest, servers):
    a, _, c = servers
    sb = started(request.param, network="allowlist", allow=[f"127.0.0.1:{a.port}"], pip_index_url=c.url("/simple/"))
    sb.write_file("fetch.py", FETCH)
    yield sb
    sb.close()


def fetch(sb: Sandbox, url: str, *flags: str, env: dict[str, str] | None = VIA_PROXY) -> str:
    res = sb.exec(f"python3 fetch.py {url} {' '.join(flags)}", timeout=30, env=env)
    assert res.exit_code == 0, res
    return res.stdout.strip()


def test_allow_listed_server_is_reached_through_the_proxy(box: Sandbox, servers) -> None:
    a, _, _ = servers
    before = box.egress.forwarded  # type: ignore[attr-defined]
    assert fetch(box, a.url("/pkg/index.html?v=1")) == "OK 200 served by A"
    method, path, headers = a.hits[-1]
    assert (method, path) == ("GET", "/pkg/index.html?v=1")  # origin form upstream, query kept
    assert "Proxy-Connection" not in headers and headers["Host"] == f"127.0.0.1:{a.port}"
    assert fetch(box, a.url("/upload"), "--post", "payload-123") == "OK 200 payload-123"
    assert box.egress.forwarded == before + 2  # type: ignore[attr-defined]


def test_other_host_or_port_is_refused_with_403_and_recorded(box: Sandbox, servers) -> None:
    _, b, _ = servers
    assert fetch(box, b.url("/secret")) == "ERR HTTPError HTTP Error 403: Forbidden"
    assert "Tunnel connection failed: 403" in fetch(box, f"https://127.0.0.1:{b.port}/secret")
    assert b.hits == []
    refused = [(r.host, r.port, r.method) for r in box.egress.refusals]  # type: ignore[attr-defined]
    assert ("127.0.0.1", b.port, "GET") in refused and ("127.0.0.1", b.port, "CONNECT") in refused


def test_403_body_tells_the_agent_what_is_allowed(box: Sandbox, servers) -> None:
    a, b, _ = servers
    code = f"import urllib.request as u\ntry: u.urlopen('{b.url()}')\nexcept Exception as e: print(e.read().decode())"
    res = box.exec(f'python3 -c "{code}"', timeout=30, env=VIA_PROXY)
    assert f"127.0.0.1:{b.port} is not on this sandbox's allow-list (127.0.0.1:{a.port}" in res.stdout


def test_direct_connections_bypassing_the_proxy_fail(box: Sandbox, servers) -> None:
    a, _, _ = servers
    hits = len(a.hits)
    assert fetch(box, a.url(), "--direct").startswith("ERR URLError")  # 127.0.0.1 is the sandbox's own
    routes = box.exec(
        "python3 -c \"import socket; socket.create_connection(('203.0.113.7', 80), timeout=3)\"", timeout=30
    )
    why = routes.stderr.lower()  # Linux: "network is unreachable"; gVisor: "no route to host"
    assert routes.exit_code != 0 and ("unreachable" in why or "no route to host" in why), routes
    ifaces = box.exec("tail -n +3 /proc/net/dev | cut -d: -f1", timeout=10).stdout.split()
    assert ifaces == ["lo"] and len(a.hits) == hits


def test_pip_mirror_is_exported_and_allowed(box: Sandbox, servers) -> None:
    _, _, c = servers
    env = box.exec('echo "$PIP_INDEX_URL $PIP_TRUSTED_HOST $HTTPS_PROXY"', timeout=10).stdout.split()
    assert env == [c.url("/simple/"), "127.0.0.1", "http://127.0.0.1:3128"]
    assert fetch(box, c.url("/simple/numpy/")) == "OK 200 served by C"


def test_sandbox_loopback_stays_direct(box: Sandbox) -> None:
    refusals = len(box.egress.refusals)  # type: ignore[attr-defined]
    res = box.exec(
        "python3 -m http.server 8765 --bind 127.0.0.1 --directory /tmp >/dev/null 2>&1 & "
        "python3 fetch.py http://127.0.0.1:8765/ --retry",
        timeout=30,
    )
    assert res.stdout.startswith("OK 200"), res
    assert len(box.egress.refusals) == refusals  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", BACKENDS)
def test_network_none_reaches_nothing(backend: str, servers) -> None:
    a, b, _ = servers
    before = (len(a.hits), len(b.hits))
    with started(backend, network="none") as sb:
        assert getattr(sb, "egress", None) is None
        assert sb.exec("env | grep -ci proxy", timeout=10).stdout.strip() == "0"
        sb.write_file("fetch.py", FETCH)
        assert fetch(sb, a.url(), env=None).startswith("ERR URLError")
        forced = {"http_proxy": "http://127.0.0.1:3128", "https_proxy": "http://127.0.0.1:3128"}
        assert fetch(sb, b.url(), env=forced).startswith("ERR URLError")  # no forwarder to talk to
    assert (len(a.hits), len(b.hits)) == before


@pytest.mark.docker
def test_docker_allowlist_without_python3_in_the_image_fails_at_start_saying_why() -> None:
    from klong_megatron.sandbox import SandboxError

    with pytest.raises(SandboxError, match=r"allowlist runs python3.*executable file not found"):
        started("docker", network="allowlist", allow=["mirror.local"], env={"PATH": "/nonexistent"})
