# SPDX-License-Identifier: Apache-2.0
"""Strict YAML configs: every shipped config validates; typos, wrong types and bad batch math are named."""
import glob
import os

import pytest

from ms_llm.cli import main
from ms_llm.config import help_text, load_config
from ms_llm.errors import MsLlmError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_configs_exist():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.global_batch == cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.parallel.data_parallel


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


BASE = "stage: pretrain\nmodel:\n  preset: tiny\ndata:\n  sources:\n    - {path: a.jsonl}\n"


def test_typo_names_file_line_and_suggestion(tmp_path):
    path = _write(tmp_path, BASE + "train:\n  max_step: 3\n")
    with pytest.raises(MsLlmError, match=r"c.yaml:8: unknown key 'train.max_step'; did you mean 'train.max_steps'\?"):
        load_config(path)
    path = _write(tmp_path, BASE + "train:\n  lr: 0.1\n")
    with pytest.raises(MsLlmError, match=r"unknown key 'train.lr'; did you mean 'optim.lr'\?"):
        load_config(path)
    path = _write(tmp_path, BASE.replace("{path: a.jsonl}", "{path: a.jsonl, wieght: 2}"))
    with pytest.raises(MsLlmError, match=r"unknown key 'data.sources\[0\].wieght'; did you mean 'data.sources\[0\].weight'"):
        load_config(path)


def test_types_choices_and_overrides(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load_config(path, ["optim.lr=1e-4", "train.micro_batch_size=2", "lr_schedule.type=wsd"])
    assert cfg.optim.lr == 1e-4 and cfg.train.micro_batch_size == 2 and cfg.lr_schedule.type == "wsd"
    with pytest.raises(MsLlmError, match=r"override 'train.max_steps=ten'\): key 'train.max_steps' must be int"):
        load_config(path, ["train.max_steps=ten"])
    with pytest.raises(MsLlmError, match=r"key 'train.amp_level' = 'O5' is not one of"):
        load_config(path, ["train.amp_level=O5"])


def test_global_batch_rule(tmp_path):
    path = _write(tmp_path, BASE + "train:\n  micro_batch_size: 2\n  grad_accum_steps: 4\n  global_batch_size: 16\n"
                  "parallel:\n  data_parallel: 2\n")
    assert load_config(path).global_batch == 16
    with pytest.raises(MsLlmError, match=r"global_batch_size \(16\) must equal .* = 8"):
        load_config(path, ["parallel.data_parallel=1"])


def test_cli_reports_config_errors_with_exit_2(tmp_path, capsys):
    path = _write(tmp_path, BASE + "optim:\n  lrr: 1\n")
    assert main(["train", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'optim.lrr'; did you mean 'optim.lr'?" in err[0]


def test_help_config_lists_every_section(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key in ("train.grad_accum_steps", "lr_schedule.decay_shape", "data.sources[].weight", "checkpoint.resume"):
        assert key in out
    assert "Micro-batches accumulated into one update" in help_text()
