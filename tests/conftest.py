# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: every test runs in its own temporary directory (MindSpore writes rank_0/, kernel_meta/)."""
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn

from ms_llm.models.readout import make_readout


# The longest test files, longest first. With `-n 2 --dist loadfile` each worker takes the next file in collection
# order when it is free, so a long file collected last would run alone at the end; starting with them keeps the two
# workers busy until both finish (longest-processing-time-first). Order within a file is unchanged.
LONGEST_FIRST = ("test_pipeline_seeds.py", "stages/test_distill.py", "test_distributed.py", "test_pipeline_chain.py", "stages/test_grpo.py",
                 "stages/test_grpo_resume.py", "stages/test_ppo.py", "stages/test_dpo.py", "stages/test_cpt.py",
                 "stages/test_sft.py", "stages/test_reward.py", "eval/test_sandbox_prefix.py", "eval/test_sandbox.py",
                 "training/test_disk_full.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        for i, name in enumerate(LONGEST_FIRST):
            if path.endswith(name):
                return i
        return len(LONGEST_FIRST)
    items[:] = sorted(items, key=rank)          # stable: files keep their own order, tests theirs


# The device every test runs on: CPU, or with MS_LLM_TEST_DEVICE=ascend an Ascend NPU (`pytest -m ascend` there:
# the tests written for it; MindSpore refuses to change the device once set, so it is chosen once, here).
DEVICE = "Ascend" if os.environ.get("MS_LLM_TEST_DEVICE", "cpu").lower() == "ascend" else "CPU"


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device(DEVICE)
    ms.set_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


TINY_HF = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)


def make_hf_model(family: str, path, **overrides):
    """Save a random tiny transformers model of `family` (llama, qwen2, qwen3) to `path`; return the torch model."""
    import torch
    import transformers
    kw = {**TINY_HF, **overrides}
    if family == "llama":
        cfg, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**{"tie_word_embeddings": True, **kw}), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.Qwen3Config(**{"head_dim": 32, **kw}), transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():      # random init leaves norms at 1 and biases at 0: perturb so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(os.fspath(path))
    return model


def torch_logits(model, ids, **kw):
    import torch
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long), **kw).logits.float().numpy()


def make_workdir(tmp_path_factory, name: str, **synth):
    """A directory laid out like the project: data/tiny/ (synthetic datasets) and a copy of configs/."""
    import shutil
    from ms_llm.data.synthetic import synthesize
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = tmp_path_factory.mktemp(name)
    synthesize(str(d / "data" / "tiny"), **synth)
    shutil.copytree(os.path.join(root, "configs"), d / "configs")
    return d


def run_cli(workdir, *args, timeout: int = 900):
    """`ms-llm ARGS` in a subprocess in `workdir`; asserts it succeeded and returns the CompletedProcess."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "ms_llm.cli", *args], cwd=workdir, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _once_per_run(tmp_path_factory, name: str, build):
    """Build a session fixture once for the whole test run, even across pytest-xdist workers: the first worker
    to need it builds it under a file lock in the directory the workers share; the others wait and reuse it.
    (Each test file writes its own runs under names no other file uses.)"""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build()
    from filelock import FileLock
    shared = tmp_path_factory.getbasetemp().parent
    done = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            import json
            done.write_text(json.dumps(str(build())))
    import json
    from pathlib import Path
    return Path(json.loads(done.read_text()))


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """A project-shaped work dir with the tiny model pretrained into runs/tiny_pretrain (shared by the stage
    tests that start from it: sft, cpt, reward, dpo, ppo). Tests write their runs under other names in runs/."""
    def build():
        d = make_workdir(tmp_path_factory, "pretrained")
        run_cli(d, "train", "configs/tiny/pretrain.yaml", "data.eval_fraction=0", "train.progress_bar=false",
                "log.plots=false")
        return d
    return _once_per_run(tmp_path_factory, "tiny_pretrained", build)


@pytest.fixture(scope="session")
def tiny_reward(tmp_path_factory, tiny_pretrained):
    """configs/tiny/reward.yaml trained from the tiny pretrained model: runs/tiny_reward in that work dir."""
    def build():
        run_cli(tiny_pretrained, "train", "configs/tiny/reward.yaml", "train.progress_bar=false", "log.plots=false")
        return tiny_pretrained / "runs" / "tiny_reward"
    return _once_per_run(tmp_path_factory, "tiny_reward", build)


@pytest.fixture(scope="session")
def tiny_sft_agent(tmp_path_factory, tiny_pretrained):
    """configs/tiny/sft_agent.yaml shortened to 400 steps from the tiny pretrained model: runs/agent_sft_short in
    that work dir (the agent SFT and agentic GRPO tests start from it). It calls the right tool for most prompts;
    its arguments are often wrong, so its episodes' rewards vary within a group."""
    def build():
        run_cli(tiny_pretrained, "train", "configs/tiny/sft_agent.yaml", "model.init_from=runs/tiny_pretrain",
                "train.output_dir=runs/agent_sft_short", "train.max_steps=400", "optim.lr=2e-3",
                "train.eval_every=400", "sft.eval_tool_call_limit=40", "sft.eval_limit=8", "train.progress_bar=false",
                "log.plots=false")
        return tiny_pretrained / "runs" / "agent_sft_short"
    return _once_per_run(tmp_path_factory, "tiny_sft_agent", build)


@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory, tiny_pretrained):
    """configs/tiny/sft_lora.yaml trained from the tiny pretrained model: runs/tiny_sft_lora in that work dir
    (the GRPO tests start from it). One conversation per row, as the GRPO tests' figures were measured from: the
    packed SFT model already answers 45% of GRPO's training prompts (15% unpacked), and 40 steps then move it by
    less than their noise (0.453 -> 0.436 in one run)."""
    def build():
        run_cli(tiny_pretrained, "train", "configs/tiny/sft_lora.yaml", "train.eval_every=0", "train.progress_bar=false",
                "log.plots=false", "data.packing=false")
        return tiny_pretrained / "runs" / "tiny_sft_lora"
    return _once_per_run(tmp_path_factory, "tiny_sft", build)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A randomly initialised tiny model with the synthetic tokenizer in tmp_path/model (data in tmp_path/data)."""
    import mindspore as ms
    from ms_llm.data.synthetic import synthesize
    from ms_llm.data.tokenizer import Tokenizer
    from ms_llm.models import CausalLM, preset, save_pretrained
    synthesize(str(tmp_path / "data"), n_text=50, n_sft=50, n_eval=20)
    tok = Tokenizer.load(tmp_path / "data" / "tokenizer")
    ms.set_seed(3)
    save_pretrained(CausalLM(preset("tiny", vocab_size=tok.vocab_size)), tmp_path / "model")
    tok.save(tmp_path / "model")
    return tmp_path


def kill_once_written(workdir, args, marker, timeout: int = 300):
    """Start `ms-llm ARGS`, SIGKILL it as soon as `marker` exists (e.g. a checkpoint's MANIFEST.json)."""
    import signal
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, "-m", "ms_llm.cli", *args], cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_resumed_run_equals(a, b, steps: int, killed_at: int, weight_files=("model.safetensors",)):
    """Run dir `b` (killed after step `killed_at`, then resumed) logged every step once, its per-step losses
    after the kill equal uninterrupted run `a`'s, and so do its final weights (all <= 1e-6). A stage that evaluates
    before any update logs that as step 0, once, with the same values in both runs."""
    import json
    from ms_llm.models.safetensors_io import read_safetensors
    rows = [[json.loads(x) for x in open(r / "metrics.jsonl")] for r in (a, b)]
    (za, ra), (zb, rb) = ([[r for r in x if r["step"] == 0], [r for r in x if r["step"] > 0]] for x in rows)
    assert len(zb) == len(za) <= 1
    for x, y in zip(za, zb):
        assert set(x) == set(y) and all(x[k] == pytest.approx(y[k], abs=1e-6) for k in x)
    assert [r["step"] for r in rb] == list(range(1, steps + 1))
    np.testing.assert_allclose([r["loss"] for r in rb][killed_at:], [r["loss"] for r in ra][killed_at:], atol=1e-6)
    for name in weight_files:
        wa, wb = read_safetensors(str(a / "final" / name)), read_safetensors(str(b / "final" / name))
        assert set(wa) == set(wb) and max(np.abs(wa[k] - wb[k]).max() for k in wa) <= 1e-6


class LogitTable(nn.Cell):
    """Logits [N, S, V] that are themselves the parameter, offered through the interface the loss cells read a
    language model by (models/readout.py): hidden states, then whole logits. Calling it returns the logits."""

    def __init__(self, logits):
        super().__init__()
        self.table = Parameter(Tensor(logits), name="table")

    def construct(self, ids, *args):
        return self.table * 1.0

    def hidden_states(self, ids, *args):
        return self.table * 1.0

    def logits(self, hidden):
        return hidden

    def readout_cell(self, temperature=1.0, entropy=False):
        return make_readout("whole", temperature, entropy)


@pytest.fixture
def logit_table():
    return LogitTable
