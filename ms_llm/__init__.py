# SPDX-License-Identifier: Apache-2.0
"""ms_llm: train domain LLMs on MindSpore, from distillation to RLHF, on Ascend or CPU."""

__version__ = "0.1.0"
