# SPDX-License-Identifier: Apache-2.0
"""Training throughput, side by side: `ms-llm bench train [--hidden 512 --layers 8 --seq 512 --batch 4]`.

The same Llama config and batch are trained with ms_llm (GRAPH_MODE step cell, AdamW), Hugging Face
transformers on PyTorch (eager, torch.optim.AdamW) and, when the [mindformers] extra is installed,
mindformers' LlamaForCausalLM (GRAPH_MODE TrainOneStepCell). Each runs in its own child process so peak
RSS is its own; compilation and two warm-up steps are excluded. MFU = achieved training FLOP/s over the
machine's fp32 GEMM peak, measured here with a 2048^3 matmul in every library (the best one counts, leaving out
a library whose OpenBLAS fell back to a generic core: bench/blas.py names each library's core).

`ms_llm_dp2`, `ms_llm_dp2_buckets` and `ms_llm_zero3` train the same global batch on 2 msrun ranks (each rank
half of the rows, one CPU core each on a 2-core machine): plain data parallel with one AllReduce per gradient
and with gradients summed in 25 MB buckets (`parallel.bucket_mb: 25`), and ZeRO-3 (training/zero.py).
Their peak RSS is rank 0's own (the largest of the two ranks' when they differ).
"""
import argparse
import importlib.util
import json
import os
import resource
import time

import numpy as np

from ms_llm.bench import run_worker
from ms_llm.bench.blas import cores, generic
from ms_llm.errors import MsLlmError

FRAMEWORKS = ("ms_llm", "ms_llm_reference", "ms_llm_lora", "torch", "mindformers", "ms_llm_dp2", "ms_llm_dp2_buckets",
              "ms_llm_zero3")
# 2 msrun ranks: (ZeRO-3?, parallel.bucket_mb): one AllReduce per gradient (the default), and 25 MB buckets
RANKED = {"ms_llm_dp2": (False, 0.0), "ms_llm_dp2_buckets": (False, 25.0), "ms_llm_zero3": (True, 0.0)}


def train_flops_per_token(h, layers, inter, vocab, seq) -> float:
    """6 x matmul parameters (forward + backward) plus attention scores and values (PaLM appendix B)."""
    n = layers * (4 * h * h + 3 * h * inter) + h * vocab
    return 6 * n + 12 * layers * h * seq


def _gemm_gflops(fn, n=2048, reps=5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def measure_peak() -> dict:
    # this probe process compares the frameworks' GEMMs: it alone loads both
    import mindspore as ms
    import torch
    a = np.random.rand(2048, 2048).astype(np.float32)
    ta = torch.from_numpy(a)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ma = ms.Tensor(a)
    out = {"numpy": _gemm_gflops(lambda: a @ a), "torch": _gemm_gflops(lambda: ta @ ta),
           "mindspore": _gemm_gflops(lambda: ms.ops.matmul(ma, ma).asnumpy())}
    blas = cores()
    # a library on OpenBLAS's generic fallback core measures the library, not the machine: not the peak
    out["peak"] = max(v for k, v in out.items() if not generic(blas.get(k, "")))
    return out, blas


def _batch(a):
    rng = np.random.RandomState(0)
    return rng.randint(0, a.vocab, (a.batch, a.seq + 1)).astype(np.int32)


def run_ms_llm_lora(a):
    return run_ms_llm(a, lora=True)


def run_ms_llm_reference(a):
    """ms_llm with MindSpore's composed ops instead of the CPU kernels (context.kernels: reference)."""
    return run_ms_llm(a, kernels="reference")


def run_ms_llm(a, lora: bool = False, kernels: str = "auto"):
    # MindSpore only in the process that runs the MindSpore side
    import mindspore as ms

    from ms_llm.context import setup_context
    from ms_llm.losses.lm import LMLoss
    from ms_llm.models import CausalLM, preset
    from ms_llm.training.optim import AdamW
    from ms_llm.training.step import LossScaleState, TrainStep
    setup_context("graph", seed=0, kernels=kernels)
    model = CausalLM(preset("tiny", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                            num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                            max_position_embeddings=a.seq))
    if lora:                                  # seed 000's setting: r=8, alpha=16 on q_proj and v_proj
        # MindSpore only in the process that runs the MindSpore side
        from ms_llm.peft import LoRAConfig, apply_lora
        apply_lora(model, LoRAConfig(8, 16.0, 0.05, ["q_proj", "v_proj"]))
    loss_net = LMLoss(model)
    step = TrainStep(loss_net, AdamW(loss_net.trainable_params(), weight_decay=0.1), LossScaleState(False), 1, 1.0,
                     loss_norm=float(a.batch * a.seq))
    ids = _batch(a)
    batch = [(ms.Tensor(ids[:, :-1]), ms.Tensor(ids[:, 1:]))]
    return lambda: step(batch, 1e-4)["loss"]


def run_ms_llm_ranks(a, zero3: bool, bucket_mb: float):
    """One of 2 msrun ranks: half of the batch's rows, gradients summed over the ranks in buckets of `bucket_mb`
    (ZeRO-3: the matrices' reduce-scattered into each rank's shards)."""
    # MindSpore only in the process that runs the MindSpore side
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    from ms_llm.context import setup_context
    from ms_llm.distributed import SumReducer
    from ms_llm.losses.lm import LMLoss
    from ms_llm.models import CausalLM, preset
    from ms_llm.training.layout import Layout
    from ms_llm.training.optim import AdamW
    from ms_llm.training.step import LossScaleState
    from ms_llm.training.zero import ZeroGroup
    setup_context("graph", seed=0)
    init()
    rank, world = get_rank(), get_group_size()
    layout = Layout(rank, world, SumReducer(None, bucket_mb), zero=ZeroGroup(rank, world) if zero3 else None)
    model = CausalLM(preset("tiny", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                            num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                            max_position_embeddings=a.seq))
    loss_net = LMLoss(model)
    params = loss_net.trainable_params()
    if zero3:
        params = layout.zero.shard(loss_net, params)
    step = layout.train_step(model, loss_net, AdamW(params, weight_decay=0.1), LossScaleState(False), 1, 1.0,
                             float(a.batch * a.seq))
    ids = _batch(a)[rank::world]
    batch = [(ms.Tensor(ids[:, :-1]), ms.Tensor(ids[:, 1:]))]
    return lambda: step(batch, 1e-4)["loss"]


def _run_ranked(fw: str, a) -> dict:
    """`fw` on 2 msrun ranks; rank 0's JSON line, with the larger of the two ranks' peak RSS."""
    # only the parent of the 2-rank runs starts msrun
    import subprocess
    import tempfile
    logs = tempfile.mkdtemp(prefix=f"bench_{fw}_")
    keys = ("hidden", "layers", "heads", "inter", "vocab", "seq", "batch", "steps", "workdir")
    argv = ["bench", "train", "--worker", fw, *[f"--{k}={getattr(a, k)}" for k in keys]]
    # msrun takes a script file and would read the worker's --flags as its own: they travel in the environment
    script = os.path.join(logs, "worker.py")
    with open(script, "w") as f:
        f.write("import json, os, sys\nfrom ms_llm.cli import main\n"
                "sys.exit(main(json.loads(os.environ['MS_LLM_BENCH_ARGV'])))\n")
    cmd = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={a.port}", f"--log_dir={logs}",
           "--join=True", script]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MS_LLM_BENCH_ARGV=json.dumps(argv)))
    rows = []
    for rank in (0, 1):
        path = os.path.join(logs, f"worker_{rank}.log")
        lines = [x for x in open(path).read().splitlines() if x.startswith("{")] if os.path.isfile(path) else []
        rows.append(json.loads(lines[-1]) if lines else None)
    if r.returncode or None in rows:
        print(f"{fw}: failed (logs in {logs})\n{r.stderr[-1000:]}")
        return None
    out = rows[0]
    out["peak_rss_mb"] = max(x["peak_rss_mb"] for x in rows)
    return out


def run_torch(a):
    # PyTorch only in the process that runs the PyTorch side
    import torch
    import transformers
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.heads, max_position_embeddings=a.seq)
    model = transformers.LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ids = torch.tensor(_batch(a), dtype=torch.long)

    def step():
        out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)
    return step


def run_mindformers(a):
    # MindSpore only in the process that runs the MindSpore side
    import mindspore as ms
    from mindspore import nn
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    # the mindformers extra, only for this comparison
    from mindformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(batch_size=a.batch, seq_length=a.seq, hidden_size=a.hidden, num_layers=a.layers,
                      num_heads=a.heads, n_kv_heads=a.heads, intermediate_size=a.inter, vocab_size=a.vocab,
                      compute_dtype="float32", param_init_type="float32", layernorm_compute_type="float32",
                      softmax_compute_type="float32", rotary_dtype="float32", fused_rms_norm=False,
                      use_rope_slice=True, use_flash_attention=False)
    net = LlamaForCausalLM(cfg)
    net.set_train(True)
    opt = nn.AdamWeightDecay(net.trainable_params(), 1e-4, weight_decay=0.1)
    step = nn.TrainOneStepCell(net, opt)
    ids = ms.Tensor(_batch(a))
    return lambda: float(step(ids).asnumpy())


def worker(a):
    """Child process: build, warm up, time `a.steps` steps, print one JSON line."""
    build = {"ms_llm": run_ms_llm, "ms_llm_reference": run_ms_llm_reference, "ms_llm_lora": run_ms_llm_lora,
             "torch": run_torch, "mindformers": run_mindformers,
             **{fw: (lambda a, z=z: run_ms_llm_ranks(a, *z)) for fw, z in RANKED.items()}}[a.worker]
    workdir = os.path.join(a.workdir, a.worker) if a.worker in RANKED else a.workdir
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)                          # MindSpore and mindformers write ./rank_0, ./output
    step = build(a)
    losses = [step() for _ in range(2)]
    t = time.perf_counter()
    losses += [step() for _ in range(a.steps)]
    dt = (time.perf_counter() - t) / a.steps
    print(json.dumps({"framework": a.worker, "step_s": dt, "tokens_per_s": a.batch * a.seq / dt,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "first_loss": losses[0], "last_loss": losses[-1]}))


def run(argv=None):
    p = argparse.ArgumentParser(prog="ms-llm bench train")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--inter", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--frameworks", default="ms_llm,ms_llm_reference,torch,mindformers",
                   help="comma list of ms_llm, ms_llm_reference (the reference ops instead of the CPU kernels), "
                        "ms_llm_lora, torch, mindformers, ms_llm_dp2, ms_llm_dp2_buckets and ms_llm_zero3 (2 msrun "
                        "ranks each)")
    p.add_argument("--port", type=int, default=8197, help="msrun's master port for the 2-rank variants")
    p.add_argument("--workdir", default=os.path.join(os.getcwd(), ".bench_train"))
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    peak, blas = measure_peak()
    flops_tok = train_flops_per_token(a.hidden, a.layers, a.inter, a.vocab, a.seq)
    results = []
    for fw in a.frameworks.split(","):
        if fw == "mindformers":
            if importlib.util.find_spec("mindformers") is None:
                print("mindformers: not installed (pip install -e .[mindformers]); skipped")
                continue
        if fw not in FRAMEWORKS:
            raise MsLlmError(f"--frameworks: unknown '{fw}'; choose from {', '.join(FRAMEWORKS)}")
        if fw in RANKED:
            res = _run_ranked(fw, a)
        else:
            res = run_worker("train", fw, a, ("hidden", "layers", "heads", "inter", "vocab", "seq", "batch", "steps",
                                              "workdir"))
        if res is None:
            continue
        res["mfu"] = res["tokens_per_s"] * flops_tok / (peak["peak"] * 1e9)
        results.append(res)
    print(f"Llama: hidden {a.hidden}, {a.layers} layers, {a.heads} heads, ffn {a.inter}, vocab {a.vocab}; "
          f"batch {a.batch} x seq {a.seq}; fp32; {a.steps} timed steps after 2 warm-up")
    print("fp32 GEMM 2048^3 GFLOPS: " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))
    print("BLAS: " + "; ".join(f"{k} {v}" + (" (a generic fallback core: not the peak)" if generic(v) else "")
                               for k, v in blas.items()))
    names = [r["framework"] for r in results]
    ref_name = next((n for n in ("torch", "ms_llm") if n in names), names[0] if names else "ms_llm")
    base = next((r for r in results if r["framework"] == ref_name), None)
    width = max([17] + [len(n) + 2 for n in names])
    print(f"{'framework':<{width}}{'tokens/s':>10}{'step s':>9}{'vs ' + ref_name:>{max(11, len(ref_name) + 5)}}{'MFU':>7}"
          f"{'peak RSS MB':>13}")
    for r in results:
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        r["vs_" + ref_name] = ratio
        print(f"{r['framework']:<{width}}{r['tokens_per_s']:>10.0f}{r['step_s']:>9.3f}"
              f"{ratio:>{max(11, len(ref_name) + 5) - 1}.2f}x{r['mfu']:>7.1%}{r['peak_rss_mb']:>13.0f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "gemm_gflops": peak, "blas": blas, "results": results}, f, indent=1)
    return results
