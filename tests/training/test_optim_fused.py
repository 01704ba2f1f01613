# SPDX-License-Identifier: Apache-2.0
"""AdamW's three update paths against a NumPy AdamW: the composed ops, the CPU kernel (bitwise equal to the
composed ops) and MindSpore's fused AdamWeightDecay with the bias corrections folded into its inputs, which
Ascend runs (the op exists on CPU too, so its arithmetic is checked here)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor

from ms_llm.training.optim import AdamW

BETAS, EPS, WD = (0.9, 0.95), 1e-8, 0.1
SHAPES = {"layers.0.mlp.up_proj.weight": (48, 32), "layers.0.input_layernorm.weight": (32,),
          "layers.0.self_attn.q_proj.bias": (48,), "embed_tokens.weight": (100, 32)}


def _numpy_adamw(values, grads_per_step, lrs, scales):
    """torch.optim.AdamW's update in float64: bias-corrected moments, decay lr x wd x param on matrices only."""
    p = {k: v.astype(np.float64) for k, v in values.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (grads, lr, scale) in enumerate(zip(grads_per_step, lrs, scales), start=1):
        for k in p:
            g = grads[k].astype(np.float64) * scale
            m[k] = BETAS[0] * m[k] + (1 - BETAS[0]) * g
            v2[k] = BETAS[1] * v2[k] + (1 - BETAS[1]) * g * g
            mhat, vhat = m[k] / (1 - BETAS[0] ** t), v2[k] / (1 - BETAS[1] ** t)
            wd = WD if len(SHAPES[k]) == 2 else 0.0
            p[k] = p[k] - lr * (mhat / (np.sqrt(vhat) + EPS) + wd * p[k])
    return p


def _run(kind, values, grads_per_step, lrs, scales):
    params = [Parameter(Tensor(values[k].copy()), name=k) for k in SHAPES]
    opt = AdamW(params, BETAS, EPS, WD, kind=kind)
    for grads, lr, scale in zip(grads_per_step, lrs, scales):
        opt(tuple(Tensor(grads[k]) for k in SHAPES), Tensor(lr, ms.float32), Tensor(scale, ms.float32))
    return {p.name: p.asnumpy() for p in params}, {n: t.asnumpy() for n, t in opt.full_state().items()}


def test_fused_adam_weight_decay_equals_the_composed_update_within_float32_rounding():
    rng = np.random.default_rng(0)
    values = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    steps = 8
    grads = [{k: (rng.normal(size=s) * 10.0 ** rng.integers(-4, 1)).astype(np.float32) for k, s in SHAPES.items()}
             for _ in range(steps)]
    lrs = [1e-3 * (t + 1) / 3 if t < 3 else 1e-3 * 0.8 ** (t - 3) for t in range(steps)]
    scales = [1.0, 0.5, 1.0, 0.25, 1.0, 1.0, 0.9, 1.0]
    want = _numpy_adamw(values, grads, lrs, scales)
    composed, composed_state = _run("composed", values, grads, lrs, scales)
    cpu, cpu_state = _run("cpu", values, grads, lrs, scales)
    device, device_state = _run("device", values, grads, lrs, scales)
    for k in SHAPES:
        np.testing.assert_array_equal(cpu[k], composed[k], err_msg=k)                  # the kernel: bitwise
        moved = np.abs(want[k] - values[k]).max()
        assert moved > 1e-3, k
        # both float32 paths against float64 NumPy, and against each other: a few float32 ulps of the weights
        # (|w| <= 4 here, one ulp 2.4e-7 to 4.8e-7), against steps that moved them by over 1e-3
        for got in (composed, device):
            np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-6, err_msg=k)
        np.testing.assert_allclose(device[k], composed[k], atol=1e-6, rtol=1e-6, err_msg=k)
    for name, value in composed_state.items():      # the moments it keeps are Adam's (to float32 rounding of each)
        np.testing.assert_allclose(device_state[name], value, rtol=1e-6, atol=1e-6 * float(np.abs(value).max()),
                                   err_msg=name)


def test_the_fused_kinds_refuse_what_they_cannot_update():
    half = Parameter(Tensor(np.zeros((4, 4), np.float16)), name="w")
    with pytest.raises(ValueError, match="AdamW kind 'device' updates unsharded float32 parameters only"):
        AdamW([half], kind="device")
    with pytest.raises(ValueError, match="AdamW kind must be None, 'cpu', 'device' or 'composed', not 'fused'"):
        AdamW([half], kind="fused")


def test_a_graph_mode_train_step_with_the_fused_op_follows_the_composed_one(graph_mode):
    """Inside the compiled train step (GRAPH_MODE, as training runs it): 4 steps of a tiny model give the same
    losses and weights (to 2e-6) with the fused op as with the composed update."""
    from ms_llm.losses.lm import LMLoss
    from ms_llm.models import CausalLM, preset
    from ms_llm.training.step import LossScaleState, TrainStep
    ids = np.random.default_rng(5).integers(3, 200, (4, 17)).astype(np.int32)
    batch = [(Tensor(ids[:, :-1]), Tensor(ids[:, 1:]))]

    def run(kind):
        ms.set_seed(0)
        model = CausalLM(preset("tiny", vocab_size=200))
        loss_net = LMLoss(model)
        opt = AdamW(loss_net.trainable_params(), BETAS, EPS, WD, kind=kind)
        step = TrainStep(loss_net, opt, LossScaleState(False), 1, 1.0, loss_norm=1.0)
        losses = [float(step(batch, 3e-3)["loss"]) for _ in range(4)]
        return losses, {n: p.asnumpy() for n, p in model.parameters_and_names()}
    (la, wa), (lb, wb) = run("composed"), run("device")
    np.testing.assert_allclose(lb, la, rtol=1e-6)
    assert la[-1] < la[0]
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], atol=2e-6, rtol=1e-6, err_msg=k)
