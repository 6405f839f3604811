"""A submission's ``reproduce.sh`` installs a package with pip through the sandbox's allow-list proxy
(``network=allowlist`` + ``pip_index_url``): a real PEP 503 index on the host serves a real wheel, pip inside
the bubblewrap sandbox finds it through the egress proxy, and the installed module runs. The same run cannot
reach a host that is not on the list. (Docker: the same path with an image that has pip, e.g.
tools/images/paper-repro.Dockerfile; the local base image has none.)"""

from __future__ import annotations

import base64
import functools
import hashlib
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from klong_megatron.config.reproduce import ReproduceConfig
from klong_megatron.config.sandbox import SandboxConfig
from klong_megatron.eval.reproduce import reproduce

pytestmark = pytest.mark.bwrap


def _wheel(dest: Path) -> Path:
    """A minimal valid wheel of package ``klong-probe`` 1.0 (module klong_probe, VALUE = 42)."""
    files = {
        "klong_probe/__init__.py": b"VALUE = 42\n",
        "klong_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: klong-probe\nVersion: 1.0\n",
        "klong_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("klong_probe-1.0.dist-info/RECORD,,")
    path = dest / "klong_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("klong_probe-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture
def index(tmp_path: Path):
    root = tmp_path / "index"
    (root / "simple" / "klong-probe").mkdir(parents=True)
    whl = _wheel(root / "simple" / "klong-probe")
    (root / "simple" / "klong-probe" / "index.html").write_text(f'<a href="{whl.name}">{whl.name}</a>\n')
    hits: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, fmt: str, *args: object) -> None:
            hits.append(self.path)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/simple/", hits
    srv.shutdown()
    srv.server_close()


def test_reproduce_sh_installs_a_package_through_the_allowlist_proxy(tmp_path: Path, index) -> None:
    url, hits = index
    sub = tmp_path / "submission"
    sub.mkdir()
    (sub / "reproduce.sh").write_text(
        "set -e\n"
        "python3 -m pip install --quiet --disable-pip-version-check --target deps klong-probe\n"
        "PYTHONPATH=deps python3 -c \"import klong_probe; print('probe value', klong_probe.VALUE)\"\n"
        "python3 -c \"import urllib.request as u\ntry: u.urlopen('http://127.0.0.1:9/simple/', timeout=10)\n"
        "except Exception as e: print('other host:', e)\"\n"
    )
    sandbox = SandboxConfig(backend="bwrap", network="allowlist", pip_index_url=url,
                            env={"no_proxy": "", "NO_PROXY": ""})  # the index is on the host's 127.0.0.1  # fmt: skip
    meta = reproduce(sub, tmp_path / "executed", ReproduceConfig(timeout_s=120, sandbox=sandbox))
    log = (tmp_path / "executed" / "reproduce.log").read_text()
    assert meta.exit_code == 0, log
    assert "probe value 42" in log
    assert any(h.endswith(".whl") for h in hits) and any("/simple/klong-probe/" in h for h in hits)
    assert "other host: HTTP Error 403" in log, log  # not on the allow-list: the proxy refuses it
