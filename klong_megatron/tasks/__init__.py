"""Task folders (PaperBench format) and the sandbox workspace an agent reproduces a paper in."""

from klong_megatron.tasks.paperbench import PaperTask, find_task_dirs, load_paper_task
from klong_megatron.tasks.workspace import PAPER_DIR, SUBMISSION, instructions, paper_messages

__all__ = [
    "PAPER_DIR",
    "SUBMISSION",
    "PaperTask",
    "find_task_dirs",
    "instructions",
    "load_paper_task",
    "paper_messages",
]
