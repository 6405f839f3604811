# Rollout / judge server image: SGLang 0.5.23 in its own environment (it pins torch 2.14.1, transformers 5.19
# and a CUDA 13 stack, which cannot share an environment with megatron-core 0.16.1 + Transformer Engine).
#   docker build -f tools/images/sglang.Dockerfile -t klong-sglang:0.5.23 .
# Weight sync from the trainer: rl.weight_sync=disk (safetensors + /update_weights_from_disk) works across
# the two images. rl.weight_sync=distributed joins trainer rank 0 and the servers in one NCCL group: both
# sides need the same NCCL version (and a torch whose TCPStore speaks the same protocol); compare
# `python -c "import torch; print(torch.__version__, torch.cuda.nccl.version())"` in both images
# (tools/gpu_check.sh reports it), or build the trainer on the same torch 2.14.1 (pip install '.[train-gpu]'
# compiles Transformer Engine against it).
ARG BASE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
FROM ${BASE}
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-dev git curl \
    && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3 /usr/local/bin/python
WORKDIR /opt/klong-megatron
COPY pyproject.toml README.md ./
COPY klong_megatron ./klong_megatron
# sglang first (it brings its torch); this package without dependencies: the servers only need its devserver
# and judge CLIs' modules when used, SGLang itself is started with python -m sglang.launch_server
RUN pip install "sglang==0.5.23" && pip install --no-deps -e . \
    && python -c "import sglang, torch; print('sglang', sglang.__version__, 'torch', torch.__version__)"
