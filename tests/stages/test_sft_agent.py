# SPDX-License-Identifier: Apache-2.0
"""Function-call SFT on the tiny agent task: a short run from the pretrained model learns to call tools in the
template's format (the right tools, well-formed), where the model before it never calls one. The arguments take
longer; the recipe's figures are in docs/agent.md."""
import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def _tools_eval(workdir, model):
    r = run_cli(workdir, "eval", "tools", "--model", model, "--data", "data/tiny/agent_eval.jsonl", "--limit", "40",
                "--mode", "pynative")
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_agent_sft_learns_to_call_the_right_tools(tiny_pretrained):
    base = _tools_eval(tiny_pretrained, "runs/tiny_pretrain")
    assert base["n"] == 40 and base["malformed"] == 0.0
    assert base["tasks"].get("multiply", 0.0) == base["tasks"].get("convert", 0.0) == 0.0     # it never calls
    run_cli(tiny_pretrained, "train", "configs/tiny/sft_agent.yaml", "model.init_from=runs/tiny_pretrain",
            "train.output_dir=runs/agent_sft_short", "train.max_steps=400", "optim.lr=2e-3", "train.eval_every=400",
            "sft.eval_tool_call_limit=40", "sft.eval_limit=8", "train.progress_bar=false", "log.plots=false")
    after = _tools_eval(tiny_pretrained, "runs/agent_sft_short")
    logged = [json.loads(line) for line in (tiny_pretrained / "runs" / "agent_sft_short" / "metrics.jsonl").open()
              if "eval/tool_choice" in line][-1]
    # the stage's own evaluation and the CLI's agree (same 40 records, greedy)
    assert logged["eval/tool_choice"] == pytest.approx(after["tool_choice"])
    assert logged["eval/tool_call_accuracy"] == pytest.approx(after["accuracy"])
    assert after["tool_choice"] >= 0.8 > base["tool_choice"] + 0.3
    assert after["malformed"] <= 0.1
