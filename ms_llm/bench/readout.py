# SPDX-License-Identifier: Apache-2.0
"""Peak memory of the log-prob readout, chunked vs whole logits: `ms-llm bench readout-memory [--vocab 32000
--seq 512]`.

Each variant runs, in its own child process, GRAPH_MODE forward + backward passes of the readout alone: from
final hidden states [B, S, H] and the lm_head matrix [V, H] (both given gradients) to the loss, on MindSpore's
reference ops (what Ascend and `context.kernels: reference` run). "whole" computes [B, S, V] logits and their
log-softmax through automatic differentiation (`context.loss_chunk_tokens: 0`); "chunked" is models/readout.py's
ChunkedReadout (`--chunk-tokens` tokens at a time, the backward recomputing each chunk). Two losses: "lm" (the
LM/SFT loss: log-probs of the labels) and "policy" (the log-probs and the entropy, what PPO and GRPO read).
The memory is measured from outside the process (/proc, bench.run_worker_sampled): the growth of the resident
set from just before the first pass (inputs built) to the peak of the passes, compile included. The gradients
of the two variants are compared in the same run.
"""
import argparse
import json
import os
import sys

import numpy as np

from ms_llm.bench import DONE, READY, run_worker_sampled

VARIANTS = ("lm/whole", "lm/chunked", "policy/whole", "policy/chunked")


def _loss_cell(lm, entropy: bool):
    # MindSpore only in the process that runs the MindSpore side
    from mindspore import nn
    from ms_llm.models.readout import read_log_probs

    class ReadoutLoss(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.lm, self.readout = lm, lm.readout_cell(1.0, entropy)

        def construct(self, hidden, targets, coef):
            logp, ent = read_log_probs(self.lm, self.readout, hidden, targets)
            return -(logp * coef).sum() - 0.01 * ent.sum()
    return ReadoutLoss()


def worker(a):
    # MindSpore only in the process that runs the MindSpore side
    import mindspore as ms
    from ms_llm.context import setup_context
    from ms_llm.models import CausalLM, preset
    os.makedirs(a.workdir, exist_ok=True)
    os.chdir(a.workdir)
    loss_kind, readout = a.worker.split("/")
    setup_context("graph", seed=0, kernels="reference", loss_chunk_tokens=a.chunk_tokens if readout == "chunked" else 0)
    lm = CausalLM(preset("tiny", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=a.seq))
    loss = _loss_cell(lm, loss_kind == "policy")
    r = np.random.RandomState(0)
    inputs = (ms.Tensor(r.standard_normal((a.batch, a.seq, a.hidden)).astype(np.float32)),
              ms.Tensor(r.randint(0, a.vocab, (a.batch, a.seq)).astype(np.int32)),
              ms.Tensor(r.uniform(0.5, 1.5, (a.batch, a.seq)).astype(np.float32)))
    grad = ms.value_and_grad(loss, 0, [lm.head_weight()])
    print(READY, flush=True)
    for _ in range(a.steps):
        value, (d_hidden, (d_w,)) = grad(*inputs)
    print(json.dumps({"variant": a.worker, "mode": loss.readout.mode, "loss": float(value),
                      "d_hidden": d_hidden.asnumpy().ravel()[::97].tolist(),
                      "d_w": d_w.asnumpy().ravel()[::997].tolist()}), flush=True)
    print(DONE, flush=True)
    sys.stdin.read()                           # stay alive until the parent has read /proc


def run(argv=None):
    p = argparse.ArgumentParser(prog="ms-llm bench readout-memory")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk-tokens", "--chunk_tokens", dest="chunk_tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workdir", default=os.path.join(os.getcwd(), ".bench_readout"))
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    keys = ("vocab", "seq", "batch", "hidden", "chunk_tokens", "steps", "workdir")
    results = {}
    for variant in VARIANTS:
        res = run_worker_sampled("readout-memory", variant, a, keys)
        if res is not None:
            results[variant] = res
    full_mb = a.batch * a.seq * a.vocab * 4 / 2 ** 20
    print(f"log-prob readout, forward + backward on the reference ops: vocab {a.vocab}, batch {a.batch} x seq "
          f"{a.seq}, hidden {a.hidden}, chunk {a.chunk_tokens} tokens; one fp32 [B, S, V] tensor = {full_mb:.0f} MB")
    print(f"{'variant':<16}{'path':>9}{'peak growth MB':>16}{'loss':>14}")
    for v, res in results.items():
        print(f"{v:<16}{res['mode']:>9}{res['peak_mb']:>16.0f}{res['loss']:>14.6f}")
    for kind in ("lm", "policy"):
        w, c = results.get(f"{kind}/whole"), results.get(f"{kind}/chunked")
        if w and c:
            rel = max(np.abs(np.subtract(w[k], c[k])).max() / max(np.abs(w[k]).max(), 1e-30)
                      for k in ("d_hidden", "d_w"))
            print(f"{kind}: chunked / whole peak {c['peak_mb'] / w['peak_mb']:.2f}; loss difference "
                  f"{abs(w['loss'] - c['loss']):.2e}; largest gradient difference {rel:.1e} of the largest gradient")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "results": results}, f, indent=1)
    return results
