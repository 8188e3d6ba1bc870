from setuptools import find_packages, setup

setup(
    name="megafusion",
    version="0.1.0",
    description="Pretraining unified multimodal transformers (Transfusion family) on megatron-core",
    packages=find_packages(include=["megafusion", "megafusion.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "megatron-core>=0.16,<0.17; python_version<'3.12'",
        "megatron-core>=0.16; python_version>='3.12'",
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
    },
    entry_points={"console_scripts": ["megafusion=megafusion.cli:main"]},
)
