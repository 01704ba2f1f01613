# SPDX-License-Identifier: Apache-2.0
"""The μP coordinate check (Yang et al. 2022, §D.1): train a few Adam steps at several widths with the same
hyperparameters and record the typical size of each activation coordinate (mean |x|) after every step.

Activations are measured on the first training batch after every step. Under standard parametrization
(SP: every matrix drawn with the same std at every width, one learning rate) the updates grow with width,
so activations and logits blow up as the model widens; under μP they stay the same size, which is what
makes the proxy's hyperparameters carry over.

    ms-llm mup coord-check --widths 64,128,256,512,1024 --out docs/img/mup_coord_check.png
    ms-llm mup lr-sweep --widths 64,256 --out docs/img/mup_lr_sweep.png   # the payoff: the best lr stays put
"""
import json
import os
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from tqdm import tqdm

from ms_llm import ops as F
from ms_llm.losses.lm import LMLoss
from ms_llm.models import mup
from ms_llm.models.config import preset
from ms_llm.models.decoder import CausalLM
from ms_llm.training.optim import AdamW
from ms_llm.training.step import LossScaleState, TrainStep


@dataclass
class CheckSettings:
    base_width: int = 64
    lr_exponent: float = 1.0
    embedding_multiplier: float = 1.0
    output_multiplier: float = 1.0
    zero_readout: bool = True
    init_std: float = None          # σ at every width (standard) / at the base width (μP); default 1/√base_width


class _Probe(nn.Cell):
    """mean |x| of the embedding output, each layer's attention and MLP outputs, and the logits."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids):
        m = self.model
        b, s = input_ids.shape
        slots = ops.broadcast_to(ops.arange(s, dtype=ms.int32).reshape(1, s), (b, s))
        mask = F.mask_bias(F.causal_mask(slots, slots))
        cos, sin = F.rope_cos_sin(slots, m.inv_freq)
        x = m.embed(input_ids)
        out = (ops.abs(x).mean(),)
        for layer in m.model.layers:
            h = layer.self_attn(layer.input_layernorm(x), cos, sin, mask)[0]
            x = x + h
            f = layer.mlp(layer.post_attention_layernorm(x))
            x = x + f
            out = out + (ops.abs(h).mean(), ops.abs(f).mean())
        return out + (ops.abs(m.logits(m.model.norm(x))).mean(),)


def model_at_width(width: int, layers: int = 2, init_std: float = 0.02, head_dim: int = 16, vocab: int = 512) -> CausalLM:
    """The tiny preset widened: head_dim fixed (more heads), MLP 2.75 x width, GQA 2:1; every matrix drawn
    with std `init_std` (standard parametrization, as Hugging Face models are initialized)."""
    heads = max(1, width // head_dim)
    return CausalLM(preset("tiny", vocab_size=vocab, hidden_size=width, intermediate_size=int(width * 11 // 4),
                           num_hidden_layers=layers, num_attention_heads=heads, initializer_range=init_std,
                           num_key_value_heads=max(1, heads // 2), head_dim=head_dim))


def markov_batches(steps: int, batch: int, seq_len: int, vocab: int, seed: int = 0) -> list:
    """Token streams with learnable structure (a noisy affine successor rule), identical for every width."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        x = np.empty((batch, seq_len + 1), np.int64)
        x[:, 0] = rng.integers(3, vocab, batch)
        for t in range(1, seq_len + 1):
            nxt = (x[:, t - 1] * 7 + 11) % (vocab - 3) + 3
            noise = rng.random(batch) < 0.2
            x[:, t] = np.where(noise, rng.integers(3, vocab, batch), nxt)
        out.append((x[:, :-1].astype(np.int32), x[:, 1:].astype(np.int32)))
    return out


def _trainer(width: int, parametrization: str, settings: CheckSettings, layers: int, seed: int, tokens: int):
    """(model, step) for one width: the model drawn (standard) or re-drawn in μP, Adam without clipping."""
    ms.set_seed(seed)
    model = model_at_width(width, layers, settings.init_std or settings.base_width ** -0.5)
    if parametrization == "mup":
        mup.apply(model, settings, fresh=True)
    params = model.trainable_params()
    scales = mup.lr_scales(model, params, settings) if parametrization == "mup" else None
    loss_net = LMLoss(model)
    loss_net.set_train(True)
    step = TrainStep(loss_net, AdamW(params, (0.9, 0.95), 1e-8, 0.0, scales), LossScaleState(False), clip=0.0,
                     loss_norm=float(tokens))
    return model, step


def run_one(width: int, parametrization: str, batches: list, lr: float, settings: CheckSettings,
            layers: int = 2, seed: int = 0) -> list:
    """[step][activation] mean |x| for one width; step 0 is the initialization."""
    model, step = _trainer(width, parametrization, settings, layers, seed, batches[0][0].size)
    probe = _Probe(model)
    # the first training batch: in a few steps on random embeddings, unseen tokens share almost no learned
    # direction with the update, so their activations change by a width-decaying (1/√width) amount
    probe_ids = ms.Tensor(batches[0][0])
    rows = [[float(v.asnumpy()) for v in probe(probe_ids)]]
    for ids, labels in batches:
        step([(ms.Tensor(ids), ms.Tensor(labels))], lr)
        rows.append([float(v.asnumpy()) for v in probe(probe_ids)])
    return rows


def lr_sweep(widths, lrs, steps: int = 100, settings: CheckSettings = None, layers: int = 2, batch: int = 8,
             seq_len: int = 32, seed: int = 0, progress: bool = True) -> dict:
    """Mean training loss of the last 10 steps for every (parametrization, width, lr): under μP the best lr
    stays put as the width grows, under standard parametrization it moves."""
    settings = settings or CheckSettings(base_width=min(widths))
    batches = markov_batches(steps, batch, seq_len, 512, seed)
    result = {"widths": list(widths), "lrs": list(lrs), "steps": steps, "base_width": settings.base_width,
              "lr_exponent": settings.lr_exponent}
    runs = [(p, w, lr) for p in ("sp", "mup") for w in widths for lr in lrs]
    bar = None
    if progress:
        bar = tqdm(total=len(runs), desc="lr-sweep", dynamic_ncols=True)
    for p, w, lr in runs:
        _, step = _trainer(w, p, settings, layers, seed, batch * seq_len)
        losses = [step([(ms.Tensor(ids), ms.Tensor(labels))], lr)["loss"] for ids, labels in batches]
        tail = [x for x in losses[-10:] if np.isfinite(x)]
        result.setdefault(p, {}).setdefault(str(w), {})[repr(lr)] = float(np.mean(tail)) if len(tail) == len(
            losses[-10:]) else float("nan")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return result


def best_lrs(result: dict, parametrization: str) -> dict:
    """{width: the lr with the lowest final loss}."""
    out = {}
    for w, by_lr in result[parametrization].items():
        finite = {float(lr): v for lr, v in by_lr.items() if np.isfinite(v)}
        out[int(w)] = min(finite, key=finite.get) if finite else None
    return out


def plot_sweep(result: dict, path: str):
    # matplotlib loads only when a figure is drawn
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    cmap = plt.get_cmap("viridis")
    widths = sorted(int(w) for w in result["sp"])
    for ax, p in zip(axes, ("sp", "mup")):
        for j, w in enumerate(widths):
            by_lr = result[p][str(w)]
            lrs = sorted(by_lr, key=float)
            ax.plot([float(x) for x in lrs], [by_lr[x] for x in lrs], marker="o", ms=3,
                    color=cmap(j / max(len(widths) - 1, 1)), label=f"width {w}")
        ax.set_xscale("log")
        ax.set_xlabel("Adam learning rate")
        ax.set_title("μP" if p == "mup" else "standard")
    axes[0].set_ylabel(f"training loss (mean of the last 10 of {result['steps']} steps)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def coord_check(widths, steps: int = 4, lr: float = 1e-2, settings: CheckSettings = None, layers: int = 2,
                batch: int = 4, seq_len: int = 32, seed: int = 0, progress: bool = True) -> dict:
    """{"sp"|"mup": {width: [[step][activation]]}, "names": [...]}; activations as in `_Probe`."""
    settings = settings or CheckSettings(base_width=min(widths))
    if settings.init_std is None:
        settings.init_std = settings.base_width ** -0.5
    batches = markov_batches(steps, batch, seq_len, 512, seed)
    names = ["embedding"] + [f"layer {i} {k}" for i in range(layers) for k in ("attention out", "MLP out")] + ["logits"]
    result = {"names": names, "widths": list(widths), "steps": steps, "lr": lr, "base_width": settings.base_width,
              "lr_exponent": settings.lr_exponent, "init_std": settings.init_std, "zero_readout": settings.zero_readout}
    runs = [(p, w) for p in ("sp", "mup") for w in widths]
    bar = None
    if progress:
        bar = tqdm(total=len(runs), desc="coord-check", dynamic_ncols=True)
    for p, w in runs:
        result.setdefault(p, {})[str(w)] = run_one(w, p, batches, lr, settings, layers, seed)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(run=f"{p} w={w}")
    if bar is not None:
        bar.close()
    return result


def growth(result: dict, parametrization: str, name: str, step: int = -1) -> float:
    """mean |x| of activation `name` at the widest width over the narrowest, after `step`."""
    i = result["names"].index(name)
    runs = result[parametrization]
    ws = sorted(int(w) for w in runs)
    return runs[str(ws[-1])][step][i] / runs[str(ws[0])][step][i]


def plot(result: dict, path: str):
    """One row per parametrization, one column per kind of activation (last layer), a line per step."""
    # matplotlib loads only when a figure is drawn
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = (len(result["names"]) - 2) // 2
    cols = ["embedding", f"layer {layers - 1} attention out", f"layer {layers - 1} MLP out", "logits"]
    fig, axes = plt.subplots(2, len(cols), figsize=(4 * len(cols), 7), sharex=True, sharey="col")   # same scale: compare rows
    widths = sorted(int(w) for w in result["sp"])
    steps = len(next(iter(result["sp"].values())))
    cmap = plt.get_cmap("viridis")
    for r, p in enumerate(("sp", "mup")):
        for c, name in enumerate(cols):
            ax = axes[r][c]
            i = result["names"].index(name)
            for t in range(steps):
                ax.plot(widths, [result[p][str(w)][t][i] for w in widths], marker="o", ms=3,
                        color=cmap(t / max(steps - 1, 1)), label=f"step {t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{'μP' if p == 'mup' else 'standard'}: {name}", fontsize=10)
            if r == 1:
                ax.set_xlabel("width (hidden size)")
            if c == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"Coordinate check: Adam lr {result['lr']:g}, {result['steps']} steps, init std "
                 f"{result['init_std']:.3g}; μP base width {result['base_width']}, lr exponent "
                 f"{result['lr_exponent']:g}, zero readout {result['zero_readout']}", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(result: dict, path: str):
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
