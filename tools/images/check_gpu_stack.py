"""Fail an image build (``--build``) when its GPU stack cannot run this package, naming the versions.

Checks: torch has CUDA; megatron-core is 0.16.1; Transformer Engine imports and lies in megatron-core
0.16.1's ``>=2.9,<2.12``. Prints the versions either way.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys

from packaging.version import Version


def problems() -> tuple[list[str], dict[str, str | None]]:
    import torch

    found: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("megatron-core", "transformer-engine"):
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            found[dist] = None
    bad = []
    if torch.version.cuda is None:
        bad.append(f"torch {torch.__version__} is a CPU build")
    if found["megatron-core"] != "0.16.1":
        bad.append(f"megatron-core {found['megatron-core']} (this package pins 0.16.1)")
    te = found["transformer-engine"]
    if te is None or not Version("2.9") <= Version(Version(te).base_version) < Version("2.12"):
        bad.append(f"transformer-engine {te} (megatron-core 0.16.1 wants >=2.9,<2.12: pick another base image)")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # a broken extension is as bad as a missing one
        bad.append(f"import transformer_engine.pytorch failed: {exc}")
    return bad, found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", action="store_true", help="exit 1 on a problem (image builds)")
    build = ap.parse_args().build
    bad, found = problems()
    print("GPU stack:", ", ".join(f"{k} {v}" for k, v in found.items()))
    for p in bad:
        print("problem:", p, file=sys.stderr)
    if bad and build:
        sys.exit(1)


if __name__ == "__main__":
    main()
