"""megafusion's package metadata. The megatron-core range comes from megafusion/version_check.py
(MEGATRON_CORE_TESTED, read here as text: the package cannot be imported before its dependencies are installed)."""

import os
import re

from setuptools import find_packages, setup


def _megatron_core_tested() -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megafusion", "version_check.py")
    with open(path) as f:
        match = re.search(r'^MEGATRON_CORE_TESTED = "([^"]+)"$', f.read(), re.M)
    if match is None:
        raise RuntimeError(f"{path}: no MEGATRON_CORE_TESTED = \">=A,<B\" line")
    return match.group(1)


MEGATRON_CORE_TESTED = _megatron_core_tested()
MEGATRON_CORE_MIN = MEGATRON_CORE_TESTED.split(",")[0]

setup(
    name="megafusion",
    version="0.1.0",
    description="Pretraining unified multimodal transformers (Transfusion family) on megatron-core",
    packages=find_packages(include=["megafusion", "megafusion.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        f"megatron-core{MEGATRON_CORE_TESTED}; python_version<'3.12'",
        f"megatron-core{MEGATRON_CORE_MIN}; python_version>='3.12'",  # import warns outside the tested range
        "omegaconf>=2.3",
        "numpy",
        "numba>=0.60",
        "sentencepiece",
        "pyarrow",
        "psutil",
        "tqdm",
        "tensorboard",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "apex"],
        "vae": ["diffusers", "safetensors"],
        "vision": ["transformers", "safetensors"],
        "hf": ["transformers>=5.0", "safetensors"],
        "test": ["pytest", "pytest-timeout"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["megafusion=megafusion.cli:main"]},
)
