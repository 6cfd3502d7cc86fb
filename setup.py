"""Install ep_megatron: expert-parallel MoE training with load balancing for Megatron-Core and DeepSpeed."""

from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec((Path(__file__).parent / "ep_megatron" / "version.py").read_text(), version)

setup(
    name="ep_megatron",
    version=version["__version__"],
    description="Training-time expert load balancing (EPLB) and layout-free checkpoints for MoE models",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ep_megatron", "ep_megatron.*"]),
    python_requires=">=3.10",
    # A range, never a pin: a user's own CUDA build of torch must be kept, not replaced.
    install_requires=[
        "torch>=2.6",  # group_src= in torch.distributed collectives
        "deepspeed>=0.19,<0.20",
        "megatron-core>=0.16,<0.17",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "safetensors",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout", "hypothesis", "ruff", "tokenizers"],
        "hf": ["tokenizers"],
    },
    entry_points={"console_scripts": ["ep-megatron=ep_megatron.trainer.cli:main"]},
)
