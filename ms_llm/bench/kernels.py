# SPDX-License-Identifier: Apache-2.0
"""Per-op speed and memory: `ms-llm bench kernels [--hidden 512 --layers 8 --seq 512 --batch 4 --vocab 8192]`.

Each primitive of the decoder runs forward, and forward + backward, on the `ms-llm bench train` model's
shapes, three ways, each in its own child process: MindSpore's reference ops (GRAPH_MODE), the CPU kernels
of kernels/cpu (GRAPH_MODE), and PyTorch eager. The step column multiplies the forward + backward time by how
often the op runs in one training step of that model: the per-op breakdown of a step, before (reference) and
after (cpu) the kernels. AdamW is timed the same way, one update of every parameter of the model (composed
ops, the in-place kernel, torch.optim.AdamW). A second table gives the peak memory of the lm_head +
cross-entropy at vocab 32k and sequence 1024: whole-sequence logits (reference, PyTorch) against the chunked
fused kernel.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from ms_llm.bench import DONE, READY, run_worker, run_worker_sampled
from ms_llm.bench.blas import cores, generic

IMPLS = ("reference", "cpu", "torch")


def op_shapes(a) -> dict:
    """op name -> (inputs' shapes, calls per training step)."""
    b, s, h, n, f, v, L = a.batch, a.seq, a.hidden, a.heads, a.inter, a.vocab, a.layers
    d = h // n
    return {
        "linear h->h (q, k, v, o)": ({"x": (b, s, h), "w": (h, h)}, 4 * L),
        "linear h->ffn (gate, up)": ({"x": (b, s, h), "w": (f, h)}, 2 * L),
        "linear ffn->h (down)": ({"x": (b, s, f), "w": (h, f)}, L),
        "attention (causal)": ({"q": (b, n, s, d), "k": (b, n, s, d), "v": (b, n, s, d)}, L),
        "rms_norm": ({"x": (b, s, h), "w": (h,)}, 2 * L + 1),
        "swiglu": ({"g": (b, s, f), "u": (b, s, f)}, L),
        "rotary": ({"x": (b, n, s, d)}, 2 * L),
        "lm_head + log-softmax": ({"x": (b, s, h), "w": (v, h)}, 1),
    }


def param_shapes(a) -> list:
    """The bench model's parameter shapes (untied lm_head, as in `ms-llm bench train`)."""
    h, f, v = a.hidden, a.inter, a.vocab
    layer = [(h, h)] * 4 + [(f, h), (f, h), (h, f), (h,), (h,)]
    return [(v, h)] + layer * a.layers + [(h,), (v, h)]


def _adamw_fn(a, impl):
    """One AdamW update of every parameter of the bench model, as a callable."""
    rs = np.random.RandomState(2)
    arrays = [(rs.randn(*shp) * 0.02).astype(np.float32) for shp in param_shapes(a)]
    grads = [(rs.randn(*shp) * 1e-3).astype(np.float32) for shp in param_shapes(a)]
    if impl == "torch":
        # PyTorch only in the process that runs the PyTorch side
        import torch
        params = [torch.tensor(x, requires_grad=True) for x in arrays]
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
        return opt.step
    # MindSpore only in the process that runs the MindSpore side
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn
    from ms_llm.ops import backend
    from ms_llm.training.optim import AdamW
    params = [Parameter(Tensor(x), name=f"p{i}") for i, x in enumerate(arrays)]
    backend.configure({"adamw": impl})
    opt = AdamW(params, weight_decay=0.1)
    backend.configure("auto")

    class Update(nn.Cell):
        def __init__(self):
            super().__init__()
            self.opt = opt

        def construct(self, gs, lr, scale):
            self.opt(gs, lr, scale)
            return self.opt.step * 1

    update, gs = Update(), tuple(Tensor(g) for g in grads)
    lr, one = Tensor(1e-4, ms.float32), Tensor(1.0, ms.float32)
    return lambda: update(gs, lr, one).asnumpy()


def _inputs(shapes: dict, seed=0) -> dict:
    rs = np.random.RandomState(seed)
    return {k: (rs.randn(*shp) * (0.05 if k == "w" else 1.0)).astype(np.float32) for k, shp in shapes.items()}


def _time(fn, reps: int) -> float:
    fn()
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def _op_cell(name, backend, consts):
    # MindSpore only in the process that runs the MindSpore side
    import mindspore as ms
    from mindspore import nn
    from ms_llm import ops as F

    class OpCell(nn.Cell):
        """One primitive; `kind` and `backend` are Python strings, so GRAPH_MODE compiles only its branch."""

        def __init__(self):
            super().__init__()
            self.kind, self.backend = name, backend
            self.bias, self.cos, self.sin, self.tgt, self.scale = (consts.get(k) for k in
                                                                    ("bias", "cos", "sin", "tgt", "scale"))

        def construct(self, a, b=None, c=None):
            if self.kind == "linear":
                return F.linear(a, b, ms.float32, self.backend)
            if self.kind == "attention":
                return F.attention(a, b, c, self.bias, self.scale, ms.float32, self.backend)
            if self.kind == "rms_norm":
                return F.rms_norm(a, b, 1e-6, self.backend)
            if self.kind == "swiglu":
                return F.swiglu(a, b, self.backend)
            if self.kind == "rotary":
                return F.apply_rotary(a, self.cos, self.sin, self.backend)
            return F.linear_log_probs(a, b, self.tgt, ms.float32, self.backend)
    return OpCell()


def _ms_fns(name, arrs, backend):
    """(forward, forward+backward) callables for one op on MindSpore with `backend`, both compiled graphs."""
    # MindSpore only in the process that runs the MindSpore side
    import mindspore as ms
    from mindspore import Tensor, nn
    from ms_llm import ops as F
    t = {k: Tensor(v) for k, v in arrs.items()}
    consts, kind = {}, name.split(" ")[0]
    if kind == "linear":
        args = (t["x"], t["w"])
    elif kind == "attention":
        b, s = arrs["q"].shape[0], arrs["q"].shape[2]
        pos = Tensor(np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy())
        consts = {"bias": F.mask_bias(F.causal_mask(pos, pos)), "scale": arrs["q"].shape[-1] ** -0.5}
        args = (t["q"], t["k"], t["v"])
    elif kind == "rms_norm":
        args = (t["x"], t["w"])
    elif kind == "swiglu":
        args = (t["g"], t["u"])
    elif kind == "rotary":
        b, _, s, d = arrs["x"].shape
        pos = Tensor(np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy())
        consts = dict(zip(("cos", "sin"), F.rope_cos_sin(pos, Tensor(F.rope_inv_freq(d, 10000.0)))))
        args = (t["x"],)
    else:
        kind = "lm_head"
        b, s, _ = arrs["x"].shape
        consts = {"tgt": Tensor(np.random.RandomState(1).randint(0, arrs["w"].shape[0], (b, s)).astype(np.int32))}
        args = (t["x"], t["w"])
    fwd = _op_cell(kind, backend, consts)

    class Both(nn.Cell):
        def __init__(self):
            super().__init__()
            self.op = _op_cell(kind, backend, consts)
            self.grad = ms.grad(self.summed, tuple(range(len(args))))

        def summed(self, *xs):
            return self.op(*xs).sum()

        def construct(self, *xs):
            return self.grad(*xs)

    both = Both()
    return (lambda: fwd(*args).asnumpy()), (lambda: [g.asnumpy() for g in both(*args)])


def _torch_fns(name, arrs):
    # PyTorch only in the process that runs the PyTorch side
    import torch
    import torch.nn.functional as TF
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in arrs.items()}
    if name.startswith("linear"):
        f = lambda: TF.linear(t["x"], t["w"])                       # noqa: E731
    elif name.startswith("attention"):
        f = lambda: TF.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True)   # noqa: E731
    elif name == "rms_norm":
        f = lambda: TF.rms_norm(t["x"], (t["x"].shape[-1],), t["w"], 1e-6)                    # noqa: E731
    elif name == "swiglu":
        f = lambda: TF.silu(t["g"]) * t["u"]                       # noqa: E731
    elif name == "rotary":
        b, _, s, d = arrs["x"].shape
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
        ang = torch.arange(s).float()[:, None] * inv[None]
        emb = torch.cat([ang, ang], -1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]

        def f():
            x = t["x"]
            return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin
    else:
        b, s, _ = arrs["x"].shape
        tgt = torch.tensor(np.random.RandomState(1).randint(0, arrs["w"].shape[0], (b * s,)))

        def f():
            logits = TF.linear(t["x"].reshape(b * s, -1), t["w"])
            return -TF.cross_entropy(logits, tgt, reduction="none")

    def fwd():
        with torch.no_grad():
            return f()

    def both():
        for v in t.values():
            v.grad = None
        f().sum().backward()
    return fwd, both


def worker(a):
    """Child process: time every op with one implementation (or measure one op's memory); print JSON."""
    os.makedirs(a.workdir, exist_ok=True)
    os.chdir(a.workdir)
    if a.worker != "torch":
        # MindSpore only in the process that runs the MindSpore side
        from ms_llm.context import setup_context
        from ms_llm.ops import backend
        setup_context("graph", seed=0)
        if a.worker == "cpu" and backend.cpu_kernels() is None:
            # MindSpore only in the process that runs the MindSpore side
            from ms_llm.ops import kernels
            raise SystemExit(f"CPU kernels unavailable: {kernels.unavailable_reason()}")
    if a.memory:              # one lm_head + log-softmax forward + backward; the parent reads /proc (bench.__init__)
        arrs = _inputs({"x": (1, a.memory_seq, a.hidden), "w": (a.memory_vocab, a.hidden)})
        if a.worker == "torch":
            _, both = _torch_fns("lm_head", arrs)
        else:
            _, both = _ms_fns("lm_head", arrs, a.worker)
        print(READY, flush=True)
        both()
        print(json.dumps({"impl": a.worker}), flush=True)
        print(DONE, flush=True)
        sys.stdin.read()                           # stay alive until the parent has read /proc
        return
    out = {}
    for name, (shapes, _) in op_shapes(a).items():
        arrs = _inputs(shapes)
        fwd, both = _torch_fns(name, arrs) if a.worker == "torch" else _ms_fns(name, arrs, a.worker)
        out[name] = {"fwd_ms": _time(fwd, a.reps), "fwd_bwd_ms": _time(both, a.reps)}
    ms_ = _time(_adamw_fn(a, a.worker), a.reps)
    out["AdamW (every parameter)"] = {"fwd_ms": ms_, "fwd_bwd_ms": ms_}
    print(json.dumps({"impl": a.worker, "ops": out}))


def run(argv=None):
    p = argparse.ArgumentParser(prog="ms-llm bench kernels")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--inter", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--memory-vocab", "--memory_vocab", dest="memory_vocab", type=int, default=32000)
    p.add_argument("--memory-seq", "--memory_seq", dest="memory_seq", type=int, default=1024)
    p.add_argument("--workdir", default=os.path.join(os.getcwd(), ".bench_kernels"))
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--memory", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--memory-only", "--memory_only", dest="memory_only", action="store_true",
                   help="only the lm_head + loss memory table (skip the per-op timings)")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    keys = ("hidden", "layers", "heads", "inter", "vocab", "seq", "batch", "reps", "memory_vocab", "memory_seq",
            "workdir")
    timings = {}
    for impl in () if a.memory_only else IMPLS:
        res = run_worker("kernels", impl, a, keys)
        if res:
            timings[impl] = res["ops"]
    memory = {}
    for impl in IMPLS:
        a.memory = 1
        res = run_worker_sampled("kernels", impl, a, keys + ("memory",))
        if res:
            memory[impl] = res["peak_mb"]
    totals = {}
    if timings:
        shapes = op_shapes(a)
        shapes["AdamW (every parameter)"] = (None, 1)
        print(f"ops of the bench model (hidden {a.hidden}, {a.layers} layers, {a.heads} heads, ffn {a.inter}, vocab "
              f"{a.vocab}; batch {a.batch} x seq {a.seq}); fp32; mean of {a.reps} runs after 2 warm-up; ms")
        print("BLAS: " + "; ".join(f"{k} {v}" + (" (a generic fallback core)" if generic(v) else "")
                                   for k, v in cores().items()))
        head = "".join(f"{'fwd ' + i:>14}" for i in IMPLS) + "".join(f"{'fwd+bwd ' + i:>18}" for i in IMPLS)
        print(f"{'op':<27}{'per step':>9}{head}")
        totals.update({i: 0.0 for i in timings})
        for name, (_, count) in shapes.items():
            row = f"{name:<27}{count:>9}"
            row += "".join(f"{timings[i][name]['fwd_ms']:>14.1f}" if i in timings else f"{'-':>14}" for i in IMPLS)
            row += "".join(f"{timings[i][name]['fwd_bwd_ms']:>18.1f}" if i in timings else f"{'-':>18}" for i in IMPLS)
            print(row)
            for i in timings:
                totals[i] += count * timings[i][name]["fwd_bwd_ms"]
        print("AdamW: one update (no backward), in both columns")
        print("one training step's primitives and its update (calls x fwd+bwd), ms: "
              + ", ".join(f"{i} {totals[i]:.0f}" for i in timings))
    print(f"lm_head + log-softmax forward+backward at vocab {a.memory_vocab}, seq {a.memory_seq}, hidden "
          f"{a.hidden}: peak RSS growth (sampled from /proc by this process) "
          + ", ".join(f"{i} {m:.0f} MB" for i, m in memory.items()))
    if "cpu" in memory and "reference" in memory:
        print(f"fused chunked kernel: {memory['reference'] / max(memory['cpu'], 1e-9):.1f}x less than whole logits "
              "(reference)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "timings_ms": timings, "step_ms": totals, "memory_mb": memory}, f,
                      indent=1)
    return timings, memory
