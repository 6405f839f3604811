# Training image for GPU clusters: NVIDIA's PyTorch container (CUDA, cuDNN, NCCL, Transformer Engine, Apex
# prebuilt for its torch) + megatron-core 0.16.1 + this package. Build from the repository root:
#   docker build -f tools/images/train.Dockerfile -t klong-train:latest .
#   apptainer build klong-train.sif tools/images/train.def          # the same recipe for Apptainer sites
# then on a node: tools/gpu_check.sh (validates the GPU path), sbatch slurm/sft.sbatch experiment=...
# BASE: a release whose Transformer Engine satisfies megatron-core 0.16.1 (>=2.9,<2.12); the build fails
# naming the versions otherwise. NVIDIA's images pin their packages in /etc/pip/constraint.txt; torch is
# never reinstalled here (our dependencies are installed without it, so pip cannot pull another build).
ARG BASE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE}
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/klong-megatron
COPY pyproject.toml README.md ./
COPY klong_megatron ./klong_megatron
COPY hydra_configs ./hydra_configs
COPY slurm ./slurm
COPY tools ./tools
COPY benchmarks ./benchmarks
COPY tests ./tests
# our runtime dependencies minus torch (kept from the base image), then the package itself without deps
RUN python tools/images/requirements_without_torch.py > /tmp/req.txt \
    && pip install --no-deps megatron-core==0.16.1 \
    && PIP_CONSTRAINT= pip install -r /tmp/req.txt \
    && pip install --no-deps -e '.' \
    && python tools/images/check_gpu_stack.py --build
