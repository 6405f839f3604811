"""The manifest of a prepared dataset: what it was made from and with, checked before training reads it.

``manifest.json`` holds the context-policy config, the tokenizer (name and a hash of its files), the split
settings (``valid_fraction``, ``seed``), the packed length, every source file (path, split, size, sha256 and a
quick fingerprint), the counts, the pack plans' efficiency and the byte size of every store file. It is written
last, so a directory without one is an unfinished prepare (rerun it: finished shards are kept).

At training time :func:`check_manifest` compares it with the run's ``DataConfig``; a difference is a
:class:`PreparedMismatch` naming the field and both values. Source files are compared by size and fingerprint
(sha256 of the size, the first and the last MiB): hashing a multi-GB corpus on every rank would break start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from klong_megatron.config.data import DataConfig
from klong_megatron.data.render import BUNDLED_TOKENIZERS
from klong_megatron.errors import UserError

MANIFEST = "manifest.json"
VERSION = 1
_MIB = 1 << 20


class PreparedMismatch(UserError):
    """The prepared data was made with other settings than the run's; the message names both values."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * _MIB):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(path: str | Path) -> str:
    """sha256 of the file's size, first MiB and last MiB (cheap enough for every rank at start-up)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        f.seek(max(0, size - _MIB))
        h.update(f.read(_MIB))
    return h.hexdigest()


def tokenizer_hash(spec: str) -> str:
    """sha256 over the names and bytes of the tokenizer directory's files (a bundled name resolves first)."""
    path = Path(BUNDLED_TOKENIZERS.get(spec, spec))
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} (data.tokenizer={spec!r}) does not exist")
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def source_record(path: str | Path, split: str) -> dict[str, Any]:
    p = Path(path)
    return {
        "path": str(p.resolve()),
        "split": split,
        "size": p.stat().st_size,
        "sha256": file_sha256(p),
        "fingerprint": fingerprint(p),
    }


@dataclass
class Manifest:
    policy: dict[str, Any]
    tokenizer: str
    tokenizer_sha256: str
    valid_fraction: float
    seed: int
    seq_len: int
    sources: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    """trajectories, windows (train / valid), window tokens, trained tokens, skipped lines"""
    pack: dict[str, dict[str, float]] = field(default_factory=dict)
    """per split: packed sequences and efficiency (non-pad / total tokens)"""
    files: dict[str, int] = field(default_factory=dict)
    """store file name -> size in bytes"""
    prepare: dict[str, float] = field(default_factory=dict)
    """workers, seconds, window tokens per second of the run that finished it"""
    version: int = VERSION

    @classmethod
    def for_config(cls, cfg: DataConfig, sources: list[dict[str, Any]]) -> Manifest:
        return cls(
            policy=asdict(cfg.policy),
            tokenizer=cfg.tokenizer,
            tokenizer_sha256=tokenizer_hash(cfg.tokenizer),
            valid_fraction=cfg.valid_fraction,
            seed=cfg.seed,
            seq_len=cfg.seq_len or cfg.policy.max_len,
            sources=sources,
        )

    def settings_key(self) -> str:
        """Hash of everything that decides a shard's content except the source itself."""
        keep = {k: getattr(self, k) for k in ("policy", "tokenizer_sha256", "valid_fraction", "seed", "version")}
        keep["valid_by_file"] = any(s["split"] == "valid" for s in self.sources)
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()

    def write(self, directory: str | Path) -> None:
        tmp = Path(directory) / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        tmp.replace(Path(directory) / MANIFEST)

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"prepared data directory {str(directory)!r} does not exist")
        if not path.exists():
            raise UserError(f"{path}: missing: the prepare of {directory} did not finish (run it again to resume)")
        try:
            obj = json.loads(path.read_text())
            if obj.get("version") != VERSION:
                raise UserError(f"{path}: version {obj.get('version')!r}, this code reads version {VERSION}")
            return cls(**obj)
        except (json.JSONDecodeError, TypeError) as e:
            raise UserError(f"{path}: not a manifest written by klong-data prepare ({e})") from e


def _differ(where: str, field_name: str, prepared: Any, configured: Any) -> PreparedMismatch:
    return PreparedMismatch(
        f"{where}: prepared with {field_name}={prepared!r}, but the run has {field_name}={configured!r} "
        "(prepare again with the run's settings, or set the run's to the prepared ones)"
    )


def check_manifest(m: Manifest, cfg: DataConfig, where: str) -> None:
    """Raise :class:`PreparedMismatch` if ``cfg`` would have produced other windows than ``m`` holds."""
    policy = asdict(cfg.policy)
    for key in sorted(set(policy) | set(m.policy)):
        if policy.get(key) != m.policy.get(key):
            raise _differ(where, f"data.policy.{key}", m.policy.get(key), policy.get(key))
    token_hash = tokenizer_hash(cfg.tokenizer)
    if token_hash != m.tokenizer_sha256:
        raise _differ(
            where, "data.tokenizer", f"{m.tokenizer} (sha256 {m.tokenizer_sha256[:12]})",
            f"{cfg.tokenizer} (sha256 {token_hash[:12]})",
        )  # fmt: skip
    seq_len = cfg.seq_len or cfg.policy.max_len
    if seq_len != m.seq_len:
        raise _differ(where, "data.seq_len (packed length)", m.seq_len, seq_len)
    for name in ("valid_fraction", "seed"):
        if getattr(cfg, name) != getattr(m, name):
            raise _differ(where, f"data.{name}", getattr(m, name), getattr(cfg, name))
    if cfg.train_files or cfg.valid_files:  # optional: the run names its sources, they must be the prepared ones
        want = [(str(Path(f).resolve()), "train") for f in cfg.train_files]
        want += [(str(Path(f).resolve()), "valid") for f in cfg.valid_files]
        have = [(s["path"], s["split"]) for s in m.sources]
        if sorted(want) != sorted(have):
            raise _differ(where, "data.train_files/valid_files", have, want)
        for s in m.sources:
            now = fingerprint(s["path"])
            if now != s["fingerprint"]:
                raise _differ(where, f"source {s['path']} (fingerprint)", s["fingerprint"][:12], now[:12])
