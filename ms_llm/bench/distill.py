# SPDX-License-Identifier: Apache-2.0
"""Peak memory of the distillation loss, chunked vs naive: `ms-llm bench distill-memory [--vocab 32000 --seq 1024]`.

Each variant runs GRAPH_MODE training steps (forward + backward + AdamW) of DistillLoss with an online
teacher, in its own child process. "naive" computes the loss over the whole sequence at once through
automatic differentiation, so the student's and teacher's fp32 [B, S, V] logits, probabilities and gradients
all exist together; "chunked" is ChunkedDistillHead (chunk_size positions at a time in MindSpore ops,
hand-written backward that recomputes each chunk); "fused" the CPU kernel LinearDistill (kernels/cpu/distill.cc,
256 rows at a time in C++), which the distill stage runs on CPU. The last step's time is reported too.
Reported: peak RSS of the process; its growth over the RSS before the first step (what the step needed:
compile, activations, gradients, optimizer update); and the loss part, that growth minus a "floor" run of the
same step whose loss skips the vocabulary (both models' hidden states, every student parameter touched).
The student and teacher are one-layer models so that the loss, not the layers, dominates.
"""
import argparse
import json
import os
import resource
import time

import numpy as np

from ms_llm.bench import run_worker

VARIANTS = ("floor", "naive", "chunked", "fused")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _floor_cell():
    # MindSpore only in the process that runs the MindSpore side
    from mindspore import nn, ops

    class Floor(nn.Cell):
        """Everything the step needs except the loss over the vocabulary: both models' hidden states and a
        scalar that touches every student parameter (so the optimizer and gradients are all there)."""

        def __init__(self, loss):
            super().__init__(auto_prefix=False)
            self.loss = loss

        def construct(self, input_ids, labels, attention_mask, weights, row_weight):
            s = self.loss.student
            hidden = s.hidden_states(input_ids, attention_mask)
            t = ops.stop_gradient(self.loss.teacher.hidden_states(input_ids, attention_mask))
            w = s.model.embed_tokens.weight if s.tied else s.lm_head.weight
            return (hidden * t).sum() + w.sum(), row_weight.sum()
    return Floor


def _Floor(loss):
    return _floor_cell()(loss)


def worker(a):
    # MindSpore only in the process that runs the MindSpore side
    import mindspore as ms
    from ms_llm.context import setup_context
    from ms_llm.losses.distill import DistillLoss, DistillLossConfig
    from ms_llm.models import CausalLM, preset
    from ms_llm.training.optim import AdamW
    from ms_llm.training.step import LossScaleState, TrainStep
    os.makedirs(a.workdir, exist_ok=True)
    os.chdir(a.workdir)
    setup_context("graph", seed=0)

    def model(hidden):
        return CausalLM(preset("tiny", vocab_size=a.vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                               max_position_embeddings=a.seq))
    student, teacher = model(a.hidden), model(a.hidden)
    chunked = a.worker in ("chunked", "fused")
    cfg = DistillLossConfig(temperature=2.0, chunk_size=a.chunk if chunked else a.seq)
    loss = DistillLoss(student, cfg, teacher=teacher, chunked=chunked, fused=a.worker == "fused")
    if a.worker == "floor":
        loss = _Floor(loss)
    step = TrainStep(loss, AdamW(loss.trainable_params()), LossScaleState(False), 1, 1.0, loss_norm=float(a.batch))
    r = np.random.RandomState(0)
    ids = r.randint(0, a.vocab, (a.batch, a.seq + 1)).astype(np.int32)
    batch = [tuple(ms.Tensor(x) for x in (ids[:, :-1], ids[:, 1:], np.ones((a.batch, a.seq), np.int32),
                                          np.ones((a.batch, a.seq), np.float32), np.ones(a.batch, np.float32)))]
    before = _rss_mb()
    losses, seconds = [], float("nan")
    for _ in range(a.steps):
        t0 = time.perf_counter()
        losses.append(float(step(batch, 1e-4)["loss"]))
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": a.worker, "rss_before_mb": before, "peak_rss_mb": peak,
                      "step_growth_mb": peak - before, "losses": losses, "last_step_s": seconds}))


def run(argv=None):
    p = argparse.ArgumentParser(prog="ms-llm bench distill-memory")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workdir", default=os.path.join(os.getcwd(), ".bench_distill"))
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    results = {}
    for variant in VARIANTS:
        res = run_worker("distill-memory", variant, a, ("vocab", "seq", "batch", "hidden", "chunk", "steps", "workdir"))
        if res is not None:
            results[variant] = res
    full_mb = a.batch * a.seq * a.vocab * 4 / 2 ** 20
    print(f"distillation loss, online teacher: vocab {a.vocab}, batch {a.batch} x seq {a.seq}, hidden {a.hidden}, "
          f"chunk {a.chunk}; one fp32 [B, S, V] tensor = {full_mb:.0f} MB")
    floor = results.get("floor", {}).get("step_growth_mb", 0.0)
    print(f"{'variant':<9}{'peak RSS MB':>13}{'step growth MB':>16}{'loss part MB':>14}{'loss':>12}"
          f"{'step s':>9}")
    for v, res in results.items():
        res["loss_part_mb"] = res["step_growth_mb"] - floor
        print(f"{v:<9}{res['peak_rss_mb']:>13.0f}{res['step_growth_mb']:>16.0f}{res['loss_part_mb']:>14.0f}"
              f"{res['losses'][-1]:>12.4f}{res['last_step_s']:>9.2f}")
    n = results.get("naive")
    for v in ("chunked", "fused"):
        if n is not None and v in results:
            c = results[v]
            print(f"naive / {v}: peak RSS {n['peak_rss_mb'] / c['peak_rss_mb']:.2f}x, step growth "
                  f"{n['step_growth_mb'] / max(c['step_growth_mb'], 1e-9):.2f}x, loss part "
                  f"{n['loss_part_mb'] / max(c['loss_part_mb'], 1e-9):.2f}x; first-step loss difference "
                  f"{abs(n['losses'][0] - c['losses'][0]):.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "results": results}, f, indent=1)
    return results
