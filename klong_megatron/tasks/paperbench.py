"""PaperBench task folders -> validated :class:`PaperTask` records.

A task folder (as in PaperBench's ``data/papers/<paper-id>/``) holds::

    paper.md        required   the paper in Markdown (images linked as assets/asset_N.jpg)
    rubric.json     required   the grading tree (judge/rubric.py validates it)
    config.yaml     optional   ``id`` and ``title`` (strings)
    addendum.md     optional   clarifications shown to the agent and the judge
    judge.addendum.md optional shown to the judge only
    blacklist.txt   optional   one URL per line; the single word ``none`` means an empty list
    paper.pdf       optional   assets/ optional (figures)

Every error names the folder and the file. ``rubric.json`` and ``judge.addendum.md`` never reach the
agent's sandbox (workspace.py stages only the agent-visible files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from klong_megatron.judge.rubric import RubricError, TaskNode, load_rubric

REQUIRED = ("paper.md", "rubric.json")
AGENT_FILES = ("paper.md", "paper.pdf", "addendum.md", "blacklist.txt")
"""Files of a task folder the agent may see (plus ``assets/``)."""


@dataclass
class PaperTask:
    """One paper task. ``task_id`` is the folder name; ``paper_id`` the config.yaml id (may differ)."""

    task_id: str
    root: Path
    paper: str
    rubric: TaskNode
    paper_id: str = ""
    title: str = ""
    addendum: str = ""
    judge_addendum: str = ""
    blacklist: list[str] = field(default_factory=list)
    has_pdf: bool = False
    assets: list[str] = field(default_factory=list)
    """Asset file names under ``assets/`` (relative)."""

    @property
    def judge_addendum_text(self) -> str:
        """What the judge reads as the addendum: addendum.md and judge.addendum.md joined."""
        return "\n\n".join(t for t in (self.addendum, self.judge_addendum) if t)


def _text(root: Path, name: str, required: bool) -> str:
    path = root / name
    if not path.exists():
        if required:
            raise FileNotFoundError(f"task folder {root}: missing {name}")
        return ""
    if not path.is_file():
        raise ValueError(f"task folder {root}: {name} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"task folder {root}: {name} is not UTF-8 text (byte {e.start})") from None
    if required and not text.strip():
        raise ValueError(f"task folder {root}: {name} is empty")
    return text


def parse_blacklist(text: str, where: str) -> list[str]:
    """URLs of a blacklist.txt (``#`` comments and blank lines ignored; ``none`` alone = empty)."""
    urls = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    urls = [u for u in urls if u]
    if [u.lower() for u in urls] == ["none"]:
        return []
    for i, u in enumerate(urls):
        if " " in u or "." not in u:
            raise ValueError(f"{where}: line {i + 1}: expected a URL, got {u!r}")
    return urls


def _config(root: Path) -> dict[str, str]:
    text = _text(root, "config.yaml", required=False)
    if not text:
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"task folder {root}: config.yaml is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"task folder {root}: config.yaml must be a mapping, got {type(data).__name__}")
    for key in ("id", "title"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"task folder {root}: config.yaml field {key!r} must be a string")
    return data


def load_paper_task(path: str | Path) -> PaperTask:
    """Read and validate one task folder (FileNotFoundError / ValueError naming folder and file)."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"task folder {root} does not exist")
    paper = _text(root, "paper.md", required=True)
    if not (root / "rubric.json").is_file():
        raise FileNotFoundError(f"task folder {root}: missing rubric.json")
    try:
        rubric = load_rubric(root / "rubric.json")
    except RubricError as e:
        raise ValueError(f"task folder {root}: rubric.json: {e}") from None
    cfg = _config(root)
    assets_dir = root / "assets"
    assets = sorted(p.relative_to(assets_dir).as_posix() for p in assets_dir.rglob("*") if p.is_file())
    return PaperTask(
        task_id=root.name,
        root=root,
        paper=paper,
        rubric=rubric,
        paper_id=cfg.get("id", root.name),
        title=cfg.get("title", ""),
        addendum=_text(root, "addendum.md", required=False),
        judge_addendum=_text(root, "judge.addendum.md", required=False),
        blacklist=parse_blacklist(_text(root, "blacklist.txt", required=False), f"task folder {root}: blacklist.txt"),
        has_pdf=(root / "paper.pdf").is_file(),
        assets=assets if assets_dir.is_dir() else [],
    )


def find_task_dirs(path: str | Path) -> list[Path]:
    """The task folders under ``path``, sorted by name: sub-directories holding a paper.md or a
    rubric.json (a folder with only one of them is loaded, and fails naming the missing file; other
    folders, such as PaperBench's ``instructions/``, are not tasks). ``path`` may itself be one task
    folder. Raises FileNotFoundError when none is found.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"task directory {str(path)!r} does not exist")
    if any((root / n).is_file() for n in REQUIRED):
        return [root]
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and any((p / n).is_file() for n in REQUIRED))
    if not dirs:
        raise FileNotFoundError(f"{str(path)!r} holds no task folders (sub-directories with a paper.md)")
    return dirs
