# SPDX-License-Identifier: Apache-2.0
"""The stage registry (config/registry.py) is the one list of stages: each test fails when a stage is missing
from one of the places that read it — the config's choices, validation rules, the runner, `ms-llm train --help`,
the pipeline's hand-offs (every key a real config field) and the technical report."""
import dataclasses
import importlib

import pytest

from ms_llm.config import STAGE_RULES
from ms_llm.config.registry import STAGE_NAMES, STAGES, handoff_keys, kinds
from ms_llm.config.schema import ExperimentConfig

ALL = sorted(STAGE_NAMES)


def _field(cls, dotted: str):
    """The dataclass field a dotted config key names, or None."""
    head, _, rest = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if head not in fields:
        return None
    if not rest:
        return fields[head]
    sub = fields[head].default_factory() if fields[head].default_factory is not dataclasses.MISSING else None
    return _field(type(sub), rest) if dataclasses.is_dataclass(sub) else None


def test_every_stage_is_in_the_config_choices_and_the_rules():
    stage = next(f for f in dataclasses.fields(ExperimentConfig) if f.name == "stage")
    assert sorted(stage.metadata["choices"]) == ALL
    assert sorted(STAGE_RULES) == ALL


@pytest.mark.parametrize("name", ALL)
def test_every_stage_runs_and_has_its_section(name):
    entry = STAGES[name]
    module = importlib.import_module(f"ms_llm.stages.{entry.module}")
    assert callable(module.run)
    from ms_llm.stages import stage_runner
    assert stage_runner(name) is module.run
    if entry.section:
        assert _field(ExperimentConfig, entry.section) is not None, entry.section
    assert entry.loss_text and entry.report in ("pretraining", "sft", "reward", "rl")
    assert entry.report != "rl" or entry.paradigm


def test_train_help_names_every_stage():
    from ms_llm.cli import COMMANDS
    help_text = COMMANDS["train"][1]
    assert all(name in help_text for name in ALL), help_text


def test_every_hand_off_key_is_a_config_field_and_the_pipeline_takes_it():
    from ms_llm.pipeline import HANDOFF_KEYS
    keys = handoff_keys()
    assert HANDOFF_KEYS == keys
    for name, entry in STAGES.items():
        for key in list(entry.handoffs) + list(entry.frozen):
            assert key in keys, (name, key)
            for config_key in keys[key]:
                if config_key:
                    assert _field(ExperimentConfig, config_key) is not None, (name, config_key)
    # GRPO's reward model and reference can be handed over by hash, as PPO's are
    assert keys["grpo.reward_model"] == ("grpo.reward_model", "grpo.reward_sha256")
    assert keys["grpo.reference"] == ("grpo.reference.path", "grpo.reference.sha256")


def test_the_technical_report_places_every_stage():
    from ms_llm.pipeline_report import LOSS_TEXT
    assert sorted(LOSS_TEXT) == ALL and all(LOSS_TEXT.values())
    placed = [s for part in ("pretraining", "sft", "reward", "rl") for s in kinds(part)]
    assert sorted(placed) == ALL
    assert "grpo" in kinds("rl")
