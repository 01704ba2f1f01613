# SPDX-License-Identifier: Apache-2.0
"""Experiment configs: YAML -> typed dataclasses (schema.py) -> strict load and validation (load.py)."""
from ms_llm.config.load import help_text, load_config, to_yaml, validate
from ms_llm.config.schema import ExperimentConfig

__all__ = ["ExperimentConfig", "help_text", "load_config", "to_yaml", "validate"]
