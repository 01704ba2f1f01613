# SPDX-License-Identifier: Apache-2.0
"""Updaters: each normalises its own loss exactly across accumulation; a stage with two of them (policy and
value, like PPO) checkpoints both models, both optimizer states and its own state, and resumes exactly."""
import json
import os

import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from ms_llm.config import load_config
from ms_llm.errors import MsLlmError
from ms_llm.models.safetensors_io import read_safetensors, write_safetensors
from ms_llm.training.stage import Stage
from ms_llm.training.trainer import train
from ms_llm.training.updater import Updater


class SquaredError(nn.Cell):
    """(sum of masked squared errors, number of masked rows) of a linear map."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, x, y, mask):
        err = ops.square(self.net(x) - y).sum(-1) * mask
        return err.sum(), mask.sum()


class ReportingSquaredError(SquaredError):
    """SquaredError that also reports the sum of its masked predictions' first coordinate."""
    stat_names = ("pred0",)

    def construct(self, x, y, mask):
        num, den = super().construct(x, y, mask)
        return num, den, (self.net(x)[:, 0] * mask).sum().reshape((1,))


class AbsError(nn.Cell):
    """(sum of masked absolute errors, twice the masked rows): a different denominator on purpose."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, x, y, mask):
        err = ops.abs(self.net(x) - y).sum(-1) * mask
        return err.sum(), 2.0 * mask.sum()


def config(tmp_path, *overrides):
    (tmp_path / "c.yaml").write_text("model: {preset: tiny}\ndata: {sources: [{path: x.jsonl}]}\n")
    return load_config(str(tmp_path / "c.yaml"), ["train.loss_scale=none", "optim.weight_decay=0", *overrides])


def dense(seed, n_in=4, n_out=3):
    rng = np.random.default_rng(seed)
    net = nn.Dense(n_in, n_out)
    net.weight.set_data(Tensor(rng.normal(size=(n_out, n_in)).astype(np.float32)))
    net.bias.set_data(Tensor(rng.normal(size=(n_out,)).astype(np.float32)))
    return net


def numpy_grads(w, b, x, y, mask, kind):
    """Loss and gradient of the normalised loss num/den over the whole batch, in NumPy."""
    r = x @ w.T + b - y
    if kind == "sq":
        num, den, d = (np.square(r).sum(-1) * mask).sum(), mask.sum(), 2 * r
    else:
        num, den, d = (np.abs(r).sum(-1) * mask).sum(), 2 * mask.sum(), np.sign(r)
    d = d * mask[:, None] / den
    return num / den, d.T @ x, d.sum(0)


def test_each_updater_normalises_by_its_own_denominator_across_accumulation(tmp_path, graph_mode):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    ys, yv = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(6, 1)).astype(np.float32)
    mask = np.array([1, 1, 1, 1, 0, 1], np.float32)     # micro-batches of 4 and 1 valid rows: means differ
    for accum in (1, 2):
        cfg = config(tmp_path, f"train.grad_accum_steps={accum}", "train.clip_grad_norm=0")
        a, b = dense(0), dense(1, n_out=1)
        want = [numpy_grads(n.weight.asnumpy(), n.bias.asnumpy(), x, y, mask, k)
                for n, y, k in ((a, ys, "sq"), (b, yv, "abs"))]
        pol, val = Updater("policy", cfg, ReportingSquaredError(a), a), Updater("value", cfg, AbsError(b), b, lr=1e-3)
        pred0 = float(((x @ a.weight.asnumpy().T + a.bias.asnumpy())[:, 0] * mask).sum() / mask.sum())
        for upd, y, (loss, gw, gb) in zip((pol, val), (ys, yv), want):
            halves = [(x, y, mask)] if accum == 1 else [(x[:3], y[:3], mask[:3]), (x[3:], y[3:], mask[3:])]
            out = upd([tuple(Tensor(v) for v in h) for h in halves], 0)
            assert out["loss"] == pytest.approx(loss, rel=1e-6)
            assert out["grad_norm"] == pytest.approx(np.sqrt((gw ** 2).sum() + (gb ** 2).sum()), rel=1e-5)
            if upd is pol:                                  # a reported sum, divided like the loss
                assert out["pred0"] == pytest.approx(pred0, rel=1e-5)
            else:
                assert "pred0" not in out
        assert val.peak_lr == 1e-3 and pol.peak_lr == cfg.optim.lr


def test_updater_names_must_be_plain(tmp_path):
    with pytest.raises(MsLlmError, match="may not contain"):
        Updater("a/b", config(tmp_path), SquaredError(dense(0)), None)


def _writer(net):
    return lambda d: write_safetensors(os.path.join(d, "weights.safetensors"),
                                       {n: p.asnumpy() for n, p in net.parameters_and_names()})


def _reader(net):
    def read(d):
        saved = read_safetensors(os.path.join(d, "weights.safetensors"))
        for n, p in net.parameters_and_names():
            p.set_data(Tensor(saved[n]))
    return read


class TwoModelStage(Stage):
    """A stage shaped like PPO: two models, two updaters, stage state (a controller and an RNG) that every step
    reads and changes. `crash_at` raises inside a step, like a killed process."""

    def __init__(self, cfg, crash_at=None, objective="a"):
        self.policy, self.value = dense(0), dense(1, n_out=1)
        super().__init__(cfg, self.policy)
        self.pol = Updater("policy", cfg, SquaredError(self.policy), self.policy)
        self.val = Updater("value", cfg, AbsError(self.value), self.value, lr=3e-3)
        self.trained = [self.pol, self.val]
        self.rng = np.random.default_rng(7)
        self.beta, self.crash_at = 0.1, crash_at
        self.must_match = {"objective": objective}

    def updaters(self):
        return self.trained

    def step(self, step, micro_index):
        if step == self.crash_at:
            raise KeyboardInterrupt
        x = self.rng.normal(size=(5, 4)).astype(np.float32)
        mask = (self.rng.random(5) < 0.8).astype(np.float32)
        y = (x[:, :3] * self.beta).astype(np.float32)
        p = self.pol([(Tensor(x), Tensor(y), Tensor(mask))], step)
        v = self.val([(Tensor(x), Tensor(y[:, :1]), Tensor(mask))], step)
        self.beta *= 1.0 + 0.1 * np.tanh(p["loss"] - 1.0)           # an adaptive controller
        return {"loss": p["loss"], "value_loss": v["loss"], "beta": self.beta, "skipped": False}, 1

    def weights_io(self):
        return _writer(self.policy), _reader(self.policy)

    def models(self):
        return {"value": (_writer(self.value), _reader(self.value))}

    def state_dict(self):
        return dict(super().state_dict(), beta=self.beta, rng=self.rng.bit_generator.state)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.beta = state["beta"]
        self.rng.bit_generator.state = state["rng"]


def test_two_updater_stage_resumes_exactly(tmp_path, graph_mode):
    over = ["train.max_steps=7", "checkpoint.every=2", "train.progress_bar=false", "train.log_every=1",
            "optim.lr=1e-2"]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a = TwoModelStage(config(tmp_path, *over))
    ra = train(config(tmp_path, *over), a, str(a_dir))
    with pytest.raises(KeyboardInterrupt):                   # killed during step 6 (after the step-4 checkpoint)
        b = TwoModelStage(config(tmp_path, *over), crash_at=5)
        train(config(tmp_path, *over), b, str(b_dir))
    b = TwoModelStage(config(tmp_path, *over))               # a fresh process: new weights, rng, controller
    rb = train(config(tmp_path, *over), b, str(b_dir))
    assert rb.resumed_from.endswith("step_000004") and ra.steps == rb.steps == 7
    ckpt = a_dir / "checkpoints" / "step_000004"
    assert (ckpt / "weights.safetensors").exists() and (ckpt / "value" / "weights.safetensors").exists()
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    assert "value/weights.safetensors" in manifest["files"]
    opt = read_safetensors(str(ckpt / "optimizer.safetensors"))
    assert {k.split("/")[0] for k in opt} == {"policy", "value"} and int(opt["value/adam_step"]) == 4
    rows_a = [json.loads(x) for x in open(a_dir / "metrics.jsonl")]
    rows_b = [json.loads(x) for x in open(b_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows_b] == list(range(1, 8))
    for key in ("loss", "value_loss", "beta"):
        np.testing.assert_allclose([r[key] for r in rows_b][4:], [r[key] for r in rows_a][4:], atol=1e-6)
    assert len({round(r["beta"], 9) for r in rows_a}) == 7          # the controller moved every step
    for x, y in ((a.policy, b.policy), (a.value, b.value)):
        for p, q in zip(x.get_parameters(), y.get_parameters()):
            np.testing.assert_allclose(p.asnumpy(), q.asnumpy(), atol=1e-6)
    # a checkpoint of this stage does not resume a stage with other updaters
    c = TwoModelStage(config(tmp_path, *over))
    c.trained = [c.pol]
    with pytest.raises(MsLlmError, match=r"optimizer state for \['policy', 'value'\]"):
        train(config(tmp_path, *over, "train.max_steps=9"), c, str(b_dir))
    # nor one trained for another objective: the message names what differs
    c = TwoModelStage(config(tmp_path, *over, "train.max_steps=9"), objective="b")
    with pytest.raises(MsLlmError, match="trained with objective a, this config asks for b"):
        train(config(tmp_path, *over, "train.max_steps=9"), c, str(b_dir))
