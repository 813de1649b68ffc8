# megatron-soda on an NVIDIA NGC PyTorch image: CUDA, NCCL, cuDNN, Transformer Engine, apex and
# flash-attn come with the base image; this adds megatron-core and the project.
#   docker build -t megatron-soda .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v /data:/data megatron-soda soda train --config configs/soda-600m.yaml --nproc 8 ...
# On SLURM with pyxis/enroot: `soda launch slurm --container <image> ...`.
# No Docker engine runs in this project's CI: it lints this file (hadolint) instead of building it.
FROM nvcr.io/nvidia/pytorch:25.10-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    DEBIAN_FRONTEND=noninteractive

# espeak-ng: the bundled tiny corpus (demo, tests); libsndfile comes with the soundfile wheel
RUN apt-get update \
    && apt-get install -y --no-install-recommends espeak-ng=1.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/megatron-soda
COPY pyproject.toml README.md ./
COPY megatron_soda ./megatron_soda
COPY tokenization ./tokenization
COPY kernels ./kernels
COPY checkpoints_tools ./checkpoints_tools
COPY launch ./launch
COPY configs ./configs
COPY scripts ./scripts

# the image's torch (and its TE / flash-attn builds) stay; only what is missing is added
RUN pip install --no-build-isolation -e ".[dev]"

CMD ["soda", "--help"]
