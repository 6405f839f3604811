"""Lint and layering rules that keep the codebase easy to change."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "klong_megatron"

# Pure modules: no distributed, Megatron, server or network code (ARCHITECTURE.md).
PURE = ["data", "algo", "judge/rubric.py"]
FORBIDDEN = ("torch.distributed", "megatron", "sglang", "docker", "httpx", "aiohttp", "requests", "socket", "urllib")


def test_ruff_clean() -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("part", PURE)
def test_pure_modules_import_no_distributed_or_network_code(part: str) -> None:
    target = PKG / part
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    bad = [
        f"{f.relative_to(ROOT)}:{line}: imports {name}"
        for f in files
        for line, name in _imports(f)
        if any(name == m or name.startswith(m + ".") for m in FORBIDDEN)
    ]
    assert not bad, "\n".join(bad)
