"""klong-megatron: train LLM agents for extremely long-horizon tasks on Megatron-Core.

Layers (see README): experiment (hydra_configs/, slurm/, cli/) -> controller (sft/, rl/) ->
execution: pure algorithms (data/, algo/, judge/rubric.py) and edges to the world
(megatron/, rollout/, sandbox/, judge/, logging).
"""

__version__ = "0.1.0"
