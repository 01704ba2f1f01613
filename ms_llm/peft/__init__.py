# SPDX-License-Identifier: Apache-2.0
"""Parameter-efficient fine-tuning: LoRA with Hugging Face PEFT-compatible adapters."""
from ms_llm.peft.lora import (LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter, set_adapter,
                              lora_parameters)

__all__ = ["LoRAConfig", "apply_lora", "load_adapter", "merge_lora", "save_adapter", "set_adapter", "lora_parameters"]
