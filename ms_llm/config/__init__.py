# SPDX-License-Identifier: Apache-2.0
"""Experiment configs: YAML -> typed dataclasses (schema.py) -> strict load (load.py) -> cross-field validation (validate.py)."""
from ms_llm.config.load import help_text, load_config, to_yaml
from ms_llm.config.schema import ExperimentConfig
from ms_llm.config.validate import STAGE_RULES, validate

__all__ = ["ExperimentConfig", "STAGE_RULES", "help_text", "load_config", "to_yaml", "validate"]
