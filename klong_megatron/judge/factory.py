"""Build a :class:`Judge` and prepare rubrics from a :class:`JudgeConfig` (the one place config meets objects)."""

from __future__ import annotations

import os

from klong_megatron.config.judge import JudgeConfig
from klong_megatron.judge.cache import GradeCache
from klong_megatron.judge.check import CheckGrader
from klong_megatron.judge.endpoints import ChatPool
from klong_megatron.judge.judge import Judge
from klong_megatron.judge.llm import LLMGrader
from klong_megatron.judge.rubric import TaskNode, code_only, collapse_deep, zero_weight
from klong_megatron.judge.submission import TokenCounter


def prepare_rubric(tree: TaskNode, cfg: JudgeConfig) -> TaskNode:
    """The rubric as the judge grades it: every caller (klong-judge, klong-rl, klong-eval) goes through here.

    PaperBench's order and semantics (paperbench/grade.py ``run_judge``, paperbench/rubric/tasks.py):
    ``code_only`` first (only Code Development leaves; parents left empty go), then ``zero_weight_categories``
    (those leaves weigh 0, parents unchanged), then ``max_depth`` (every node at that depth, root = 1, graded
    as one leaf, as ``Judge.grade`` does with ``grade_subtree``).
    """
    if cfg.code_only:
        tree = code_only(tree)
    for category in cfg.zero_weight_categories:
        tree = zero_weight(tree, category)
    if cfg.max_depth is not None:
        tree = collapse_deep(tree, cfg.max_depth - 1)
    return tree


def build_judge(cfg: JudgeConfig) -> tuple[Judge, ChatPool | None]:
    """The judge and its chat pool (close the pool with ``await pool.aclose()`` when done)."""
    pool = llm = check = None
    if cfg.use_llm:
        pool = ChatPool(
            cfg.endpoints,
            cfg.model,
            api_key=os.environ.get(cfg.api_key_env) or None,
            max_concurrency=cfg.max_concurrency_per_endpoint,
            timeout_s=cfg.request_timeout_s,
            cooldown_s=cfg.endpoint_cooldown_s,
        )
        params = {
            "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens,
            "reasoning_effort": cfg.reasoning_effort,
        }
        llm = LLMGrader(
            pool,
            counter=TokenCounter(cfg.tokenizer),
            context_window=cfg.context_window,
            buffer_tokens=cfg.buffer_tokens,
            file_token_budget=cfg.file_token_budget,
            paper_token_budget=cfg.paper_token_budget,
            log_token_budget=cfg.log_token_budget,
            rank_files=cfg.rank_files,
            max_ranked_files=cfg.max_ranked_files,
            max_prior_nodes=cfg.max_prior_nodes,
            code_only=cfg.code_only,
            parse_mode=cfg.parse_mode,
            max_attempts=cfg.max_attempts,
            retry_timeout_s=cfg.retry_timeout_s,
            backoff_s=cfg.backoff_s,
            backoff_max_s=cfg.backoff_max_s,
            request_params={k: v for k, v in params.items() if v is not None},
        )
    if cfg.use_checks:
        from klong_megatron.sandbox import make_sandbox

        check = CheckGrader(lambda: make_sandbox(cfg.check_sandbox), timeout_s=cfg.check_timeout_s)
    judge = Judge(
        llm=llm,
        check=check,
        cache=GradeCache(cfg.cache_path),
        state_dir=cfg.state_dir,
        max_concurrent_jobs=cfg.max_concurrent_jobs,
        max_job_attempts=cfg.max_job_attempts,
    )
    return judge, pool
