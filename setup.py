"""ccmega: context compression on megatron-core LMs pretrained from scratch."""
from setuptools import find_packages, setup

setup(
    name="ccmega",
    version="0.1.0",
    description="Reproducible context-compression (ICAE) studies on Qwen3 LMs pretrained with megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["ccmega", "ccmega.*"]),
    package_data={"ccmega": ["resources/**/*"]},
    include_package_data=True,
    # torch is a range any cluster build satisfies, so pip keeps the torch already installed there.
    # On Python 3.11 megatron-core resolves to 0.16.1; on 3.12 clusters to 0.19.x.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "psutil",  # dist_checkpointing's writer hangs without it
        "pyyaml",
        "zstandard",
        "tokenizers",
        "sentencepiece",
        "safetensors",
        "sacrebleu",
        "rouge-score",
        "scipy",
        "matplotlib",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "test": ["pytest", "pytest-timeout", "transformers>=4.51"],
    },
    entry_points={"console_scripts": ["ccmega=ccmega.cli:main"]},
)
