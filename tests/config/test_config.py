# SPDX-License-Identifier: Apache-2.0
"""Strict YAML configs: every shipped config validates; typos, wrong types and bad batch math are named."""
import glob
import re
import os

import pytest

from ms_llm.cli import main
from ms_llm.config import help_text, load_config
from ms_llm.errors import MsLlmError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL_YAML = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def _is_pipeline(path: str) -> bool:
    import yaml
    with open(path) as f:
        return "stages" in (yaml.safe_load(f) or {})


PIPELINES = [p for p in ALL_YAML if _is_pipeline(p)]                 # `ms-llm pipeline` chains
CONFIGS = [p for p in ALL_YAML if p not in PIPELINES]                # experiment configs (`ms-llm train`)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.global_batch == cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.parallel.data_parallel


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_pipeline_validates(path, monkeypatch):
    from ms_llm.pipeline import load_pipeline
    monkeypatch.chdir(ROOT)                       # stage configs are named relative to the project
    pipe = load_pipeline(path)
    assert len(pipe.stages) >= 5 and all(os.path.join(ROOT, s.config) in CONFIGS for s in pipe.stages)
    assert pipe.stages[-1].inputs.get("model") == [s.name for s in pipe.stages if s.name == "sft"][0]


def test_pipelines_are_shipped_for_the_tiny_chain_and_qwen():
    names = {os.path.relpath(p, ROOT) for p in PIPELINES}
    assert names == {"configs/tiny/pipeline.yaml", "configs/tiny/pipeline_dpo.yaml", "configs/qwen2.5/7b_pipeline.yaml"}


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


def test_kernels_key_is_checked_against_the_device(tmp_path):
    path = _write(tmp_path, BASE)
    assert load_config(path).context.kernels == "auto"
    assert load_config(path, ["context.kernels=reference"]).context.kernels == "reference"
    with pytest.raises(MsLlmError, match=r"key 'context.kernels' = 'fast' is not one of"):
        load_config(path, ["context.kernels=fast"])
    with pytest.raises(MsLlmError, match=r"context.kernels 'ascend' runs on the ascend device only"):
        load_config(path, ["context.kernels=ascend"])


def test_runtime_memory_and_compile_keys(tmp_path):
    """context.max_device_memory / memory_optimize_level / jit_level: checked when the config loads, handed to
    MindSpore when the run starts (in a fresh process: the compile level is process-wide), and the installed
    MindSpore's signatures checked for the keywords they are handed."""
    import ast
    import subprocess
    import sys
    path = _write(tmp_path, BASE)
    ctx = load_config(path).context
    assert (ctx.max_device_memory, ctx.memory_optimize_level, ctx.jit_level) == ("58GB", "O0", "default")
    for value in ("58G", "0GB", "-1GB", "lots"):
        with pytest.raises(MsLlmError, match=f"context.max_device_memory '{value}' must be a positive size in GB"):
            load_config(path, [f"context.max_device_memory={value}"])
    with pytest.raises(MsLlmError, match=r"key 'context.memory_optimize_level' = 'O2' is not one of"):
        load_config(path, ["context.memory_optimize_level=O2"])
    with pytest.raises(MsLlmError, match=r"context.jit_level O2 \(whole-graph sinking\) runs on Ascend only"):
        load_config(path, ["context.jit_level=O2"])
    probe = ("import sys, mindspore as ms; from ms_llm.config import load_config; from ms_llm.context import setup_for; "
             "setup_for(load_config(sys.argv[1], sys.argv[2:])); print(ms.get_context('jit_config'))")
    for extra, level in (([], None), (["context.jit_level=O1"], "O1"), (["context.jit_level=O0"], "O0")):
        r = subprocess.run([sys.executable, "-c", probe, path, *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        got = ast.literal_eval(r.stdout.strip().splitlines()[-1]).get("jit_level")
        assert got == level if level else got in (None, "")
    import mindspore as ms
    from ms_llm.context import _needs
    _needs(ms.runtime.set_memory, ("max_size", "optimize_level"), "max_device_memory")
    with pytest.raises(MsLlmError, match=r"context.max_device_memory: the installed MindSpore .* has no "
                                         r"mindspore.*set_memory\(pool_size=...\)"):
        _needs(ms.runtime.set_memory, ("max_size", "pool_size"), "max_device_memory")


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


def test_every_stage_has_a_tiny_config_and_the_table_matches_the_schema():
    import dataclasses
    from ms_llm.config import STAGE_RULES, ExperimentConfig
    stage_field = {f.name: f for f in dataclasses.fields(ExperimentConfig)}["stage"]
    assert set(stage_field.metadata["choices"]) == set(STAGE_RULES)
    tiny = {load_config(p).stage for p in CONFIGS if os.sep + "tiny" + os.sep in p}
    assert tiny == set(STAGE_RULES)
    production = {load_config(p).stage for p in CONFIGS if os.sep + "qwen2.5" + os.sep in p}
    assert production == set(STAGE_RULES)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", r"key 'optim.lr' = -1.0 is outside its range \(0, inf\)"),
    ("optim.lr=0", r"key 'optim.lr' = 0.0 is outside its range \(0, inf\)"),
    ("train.max_steps=0", r"key 'train.max_steps' = 0 is outside its range \[1, inf\)"),
    ("optim.beta2=1.0", r"key 'optim.beta2' = 1.0 is outside its range \[0, 1\)"),
    ("optim.weight_decay=-0.1", r"key 'optim.weight_decay' = -0.1 is outside its range \[0, inf\)"),
    ("data.sources[0].weight=-2", r"key 'data.sources\[0\].weight' = -2.0 is outside its range \[0, inf\)"),
    ("sft.lora.dropout=1.5", r"key 'sft.lora.dropout' = 1.5 is outside its range \[0, 1\)"),
])
def test_numbers_out_of_range_are_refused_at_load(tmp_path, override, message):
    path = _write(tmp_path, BASE)
    with pytest.raises(MsLlmError, match=r"c.yaml \(command-line override '" + re.escape(override) + "'\\): " + message):
        load_config(path, [override])
    assert "(range (0, inf))" in help_text()


def test_a_section_given_a_value_names_its_line_and_keys(tmp_path):
    path = _write(tmp_path, BASE + "distill:\n  teacher: runs/teacher\n")
    with pytest.raises(MsLlmError, match=r"c.yaml:8: key 'distill.teacher' is a section, not a value; write its keys, "
                                         r"e.g. 'distill.teacher: \{path: 'runs/teacher'\}'"):
        load_config(path)


def test_stage_rules_come_from_the_table(tmp_path):
    path = _write(tmp_path, BASE)
    with pytest.raises(MsLlmError, match=r"parallel.tensor_parallel is supported by the pretrain and cpt stages, not "
                                         r"by stage 'reward'"):
        load_config(path, ["stage=reward", "parallel.tensor_parallel=2", "data.sources[0].format=preference"])
    with pytest.raises(MsLlmError, match=r"stage reward reads preference pairs; data.sources \['a.jsonl'\]"):
        load_config(path, ["stage=reward"])
    with pytest.raises(MsLlmError, match=r"mup.enabled is not supported by stage 'reward'"):
        load_config(path, ["stage=reward", "mup.enabled=true", "data.sources[0].format=preference"])
    with pytest.raises(MsLlmError, match=r"distill.generate.rules names unknown rules \['spelling'\]"):
        load_config(path, ["stage=distill", "distill.teacher.path=t", "distill.generate.rules=[repetition, spelling]"])


def test_lazy_inline_layers_are_the_same_layers(tmp_path):
    """context.lazy_inline: refused on CPU when forced (MindSpore's CPU backend cannot compile it in the train
    step); auto is off on CPU; a model built with it on (as on Ascend) has LazyDecoderLayer layers with the same
    parameter names, and in PyNative the same logits as the plain model with the same weights."""
    import mindspore as ms
    import numpy as np
    from ms_llm.models import CausalLM, preset
    from ms_llm.models.decoder import LazyDecoderLayer
    from ms_llm.ops import backend as B
    path = _write(tmp_path, BASE)
    assert load_config(path).context.lazy_inline == "auto"
    with pytest.raises(MsLlmError, match="context.lazy_inline always: MindSpore 2.7's CPU backend cannot compile"):
        load_config(path, ["context.lazy_inline=always"])
    saved = dict(B._settings)
    try:
        B.set_lazy_inline("auto")
        assert not B.lazy_inline()                                  # auto: off on CPU
        plain = CausalLM(preset("tiny"))
        B.set_lazy_inline("always")
        lazy = CausalLM(preset("tiny"))
    finally:
        B._settings.clear()
        B._settings.update(saved)
    assert all(isinstance(layer, LazyDecoderLayer) for layer in lazy.model.layers)
    names = [n for n, _ in plain.parameters_and_names()]
    assert names == [n for n, _ in lazy.parameters_and_names()]
    for (_, a), (_, b) in zip(plain.parameters_and_names(), lazy.parameters_and_names()):
        b.set_data(a.value())
    ids = ms.Tensor(np.random.RandomState(0).randint(0, 512, (2, 9)).astype(np.int32))
    np.testing.assert_array_equal(plain(ids).asnumpy(), lazy(ids).asnumpy())
