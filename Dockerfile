# Dockerfile: megafusion's GPU training image. NVIDIA's NGC PyTorch image brings CUDA, NCCL, PyTorch, Transformer
# Engine and apex (the `gpu` extra of setup.py, in NVIDIA's builds); on top go megatron-core at the version CI tests
# and megafusion with its other extras. The build ends by running the CPU test subset, so an image that builds has
# passed it. tests/launch/test_dockerfile.py checks the pins here against requirements-ci.txt and setup.py.
#
#   docker build -t megafusion .                         (NGC_TAG=YY.MM-py3 picks another NGC release)
#   docker run --gpus all --ipc=host --rm megafusion bash scripts/gpu_check.sh
#
# On SLURM with pyxis/enroot: srun --container-image=... ; launch/common.sh runs inside the same image on every node.
ARG NGC_TAG=26.06-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MEGAFUSION_HOME=/workspace/megafusion

WORKDIR /workspace/megafusion

# The image's own torch, Transformer Engine and apex stay: pip may not replace them (installing the `gpu` extra
# from an index would swap NVIDIA's builds for generic ones, and the index's `apex` is another project). The image's
# Python may be 3.12, where setup.py accepts megatron-core>=0.16: the pin below holds it to the tested 0.16.1.
RUN (pip list --format=freeze | grep -iE '^(torch|transformer.engine|transformer_engine_torch|apex|numpy)==' || true) \
        > /tmp/image-constraints.txt \
 && python -c "import torch, transformer_engine.pytorch, apex; print('torch', torch.__version__)" \
 && (torchrun --help | grep -q -- --shutdown-timeout \
     || { echo "this image's torchrun has no --shutdown-timeout (torch >= 2.12 needed by launch/common.sh to let ranks save after a stop signal): pick a newer NGC_TAG" >&2; exit 1; })

COPY setup.py README.md requirements-ci.txt ./
COPY megafusion ./megafusion
RUN pip install --no-cache-dir -c /tmp/image-constraints.txt "megatron-core==0.16.1" \
 && pip install --no-cache-dir -c /tmp/image-constraints.txt -e ".[vae,vision,hf,test,wandb]" \
 && python -W error::UserWarning -c "import megafusion"

COPY . .
# The build check: the CPU tests (no GPU is visible during `docker build`); the GPU ones run in scripts/gpu_check.sh.
RUN CUDA_VISIBLE_DEVICES="" python -m pytest -q -x -p no:cacheprovider -m "not slow and not distributed and not gpu"

CMD ["bash"]
