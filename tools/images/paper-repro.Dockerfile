# Paper-reproduction sandbox image (agent rollouts and the reproduction step of real paper tasks):
# Python 3.11, numpy/scipy/pandas/matplotlib/scikit-learn, torch (CPU or CUDA), git, a compiler.
#
# Build on a cluster node with network access (one command; README "Paper tasks"):
#   docker build -f tools/images/paper-repro.Dockerfile -t klong-paper-repro:py311 \
#       --build-arg TORCH_INDEX_URL=<PyTorch wheel index for your CUDA version, or its CPU index> tools/images
# then: klong-eval ... sandbox.image=klong-paper-repro:py311 reproduce.sandbox.image=klong-paper-repro:py311
#       reproduce.sandbox.gpus=1   (GPU runs need the NVIDIA container runtime)
# Without TORCH_INDEX_URL, torch comes from the default pip index. Packages a submission installs at run
# time go through the sandbox's allow-list proxy: sandbox.network=allowlist sandbox.pip_index_url=<mirror>.
# The local CI stands in with the debootstrapped klong-sandbox:bookworm image (tools/docker_engine.sh).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG TORCH_VERSION=2.5.1
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
RUN apt-get update \
    && apt-get install -y --no-install-recommends git build-essential procps ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN pip install numpy scipy pandas matplotlib scikit-learn pyyaml tqdm \
    && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
    && python -c "import numpy, scipy, pandas, matplotlib, sklearn, torch; print('torch', torch.__version__)"
WORKDIR /workspace
CMD ["/bin/sh"]
