"""Install ep_megatron: expert-parallel MoE training with load balancing for Megatron-Core and DeepSpeed.

The core installs only what the core imports. Megatron-Core and DeepSpeed are imported lazily, by the
integrations and by the features that need them (Megatron ``.bin/.idx`` data, the DeepSpeed engine), so
they are extras: a Megatron-LM git checkout installs itself under the name ``megatron-core``, and a
requirement on that name would make pip replace the user's checkout.
"""

from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec((Path(__file__).parent / "ep_megatron" / "version.py").read_text(), version)

EXTRAS = {
    "megatron": ["megatron-core>=0.16,<0.17"],  # skip it when a Megatron-LM checkout is installed
    "deepspeed": ["deepspeed>=0.19,<0.20"],
    "hf": ["tokenizers", "transformers>=5"],  # tokenizer.json text data; Hugging Face MoE models
    "tb": ["tensorboard"],
    "wandb": ["wandb"],
    "dev": ["pytest>=8", "pytest-timeout", "hypothesis", "ruff"],
}

setup(
    name="ep_megatron",
    version=version["__version__"],
    description="Training-time expert load balancing (EPLB) and layout-free checkpoints for MoE models",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["ep_megatron", "ep_megatron.*"]),
    # The run configs (configs/ at the repository root; ep_megatron/configs links to it) ship in the
    # wheel, so `ep-megatron train tiny_cpu` works after a plain `pip install`.
    package_data={"ep_megatron": ["configs/*.yaml", "configs/*.json"]},
    python_requires=">=3.10",
    # A range, never a pin: a user's own CUDA build of torch must be kept, not replaced. 2.6 is the floor
    # of megatron-core 0.16 and of the collectives' group_src / group_dst arguments we use.
    install_requires=[
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "safetensors",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["ep-megatron=ep_megatron.trainer.cli:main"]},
)
