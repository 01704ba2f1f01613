# SPDX-License-Identifier: Apache-2.0
"""Decoding speed: `ms-llm bench generate [--batch 16 --prompt-len 64 --new-tokens 256] [--compare hf,capacity]`.

On one random Llama, greedy, GRAPH_MODE, every path compiled (and warmed) before it is timed:
  * ms_llm's KV-cache `generate`;
  * hf: Hugging Face transformers `generate` with its KV cache, on PyTorch eager, with the same weights (written
    by `save_pretrained`, read by transformers in a child process, which gets all the cores);
  * capacity: 64 new tokens after a 64-token prompt with a cache of 512 and of 8192 slots;
  * recompute: ms_llm without a cache (a full forward over a fixed-width buffer per token).
Each path runs `--repeats` times and its fastest run counts (a shared machine's noise only slows runs down).
Prints tokens/s of each, the ratios, and how many rows' greedy tokens agree.
"""
import argparse
import json
import os
import time

import numpy as np

from ms_llm.errors import MsLlmError

COMPARE = ("hf", "capacity", "recompute")


def _hf_worker(a):
    """Child process: transformers' greedy `generate` on the saved model and prompts; prints one JSON line."""
    import torch          # PyTorch and transformers only in this child, never beside MindSpore
    import transformers
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(a.workdir, "model"),
                                                              torch_dtype=torch.float32).eval()
    with open(os.path.join(a.workdir, "prompts.json")) as f:
        ids = torch.tensor(json.load(f), dtype=torch.long)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True, pad_token_id=0,
              eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **kw)
            times.append(time.perf_counter() - t0)
        dt = min(times)
    print(json.dumps({"seconds": dt, "tokens": out[:, ids.shape[1]:].tolist(), "torch": torch.__version__,
                      "transformers": transformers.__version__}))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(argv=None):
    p = argparse.ArgumentParser(prog="ms-llm bench generate")
    p.add_argument("--new-tokens", "--new_tokens", dest="new_tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each path; the fastest counts")
    p.add_argument("--compare", default="hf,capacity", help=f"comma list of {', '.join(COMPARE)} (or none)")
    p.add_argument("--workdir", default=os.path.join(os.getcwd(), ".bench_generate"))
    p.add_argument("--worker", choices=("hf",), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    if a.worker:
        return _hf_worker(a)
    compare = [c for c in a.compare.split(",") if c and c != "none"]
    for c in compare:
        if c not in COMPARE:
            raise MsLlmError(f"--compare: unknown '{c}'; choose from {', '.join(COMPARE)}")
    # MindSpore only in the process that runs the MindSpore side
    from ms_llm.bench import run_worker
    from ms_llm.context import setup_context
    from ms_llm.generation import generate
    from ms_llm.models import CausalLM, preset
    from ms_llm.models.io import save_pretrained
    setup_context("graph", seed=0)
    cfg = preset("tiny", hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.75), num_hidden_layers=a.layers,
                 num_attention_heads=max(4, a.hidden // 64), num_key_value_heads=max(2, a.hidden // 128),
                 vocab_size=a.vocab, max_position_embeddings=max(a.prompt_len + a.new_tokens, 8192) + 64)
    model = CausalLM(cfg)
    prompts = np.random.RandomState(0).randint(3, a.vocab, (a.batch, a.prompt_len)).tolist()
    greedy = dict(temperature=0, eos_token_id=-1)
    slots = -(-(a.prompt_len + a.new_tokens) // 64) * 64
    generate(model, prompts, 4, cache_len=slots, **greedy)        # compile the prompt and one-token graphs
    out, dt = _timed(lambda: generate(model, prompts, a.new_tokens, cache_len=slots, **greedy))
    for _ in range(a.repeats - 1):
        dt = min(dt, _timed(lambda: generate(model, prompts, a.new_tokens, cache_len=slots, **greedy))[1])
    res = {"ms_llm": {"seconds": dt, "tokens_per_s": a.batch * a.new_tokens / dt}}
    print(f"model: hidden {a.hidden}, {a.layers} layers, vocab {a.vocab} ({cfg.num_parameters() / 1e6:.1f}M params); "
          f"batch {a.batch}, prompt {a.prompt_len}, {a.new_tokens} new tokens, greedy, CPU")
    print(f"{'path':<34}{'seconds':>9}{'tokens/s':>10}")
    print(f"{'ms_llm generate (KV cache)':<34}{dt:>9.2f}{res['ms_llm']['tokens_per_s']:>10.0f}")
    if "hf" in compare:
        os.makedirs(a.workdir, exist_ok=True)
        save_pretrained(model, os.path.join(a.workdir, "model"))
        with open(os.path.join(a.workdir, "prompts.json"), "w") as f:
            json.dump(prompts, f)
        hf = run_worker("generate", "hf", a, ("workdir", "new_tokens", "repeats"))
        if hf is not None:
            same = int(sum(np.array_equal(x, y) for x, y in zip(out.tokens, np.array(hf.pop("tokens")))))
            hf.update(tokens_per_s=a.batch * a.new_tokens / hf["seconds"], rows_identical=same)
            res["hf"] = hf
            ratio = res["ms_llm"]["tokens_per_s"] / hf["tokens_per_s"]
            res["ms_llm"]["vs_hf"] = ratio
            print(f"{'transformers ' + hf['transformers'] + ' generate':<34}{hf['seconds']:>9.2f}"
                  f"{hf['tokens_per_s']:>10.0f}")
            print(f"  ms_llm / transformers: {ratio:.2f}x; greedy rows identical: {same}/{a.batch}")
    if "capacity" in compare:
        cap = {}
        for slots in (512, 8192):
            generate(model, prompts, 4, cache_len=slots, **greedy)
            cap[slots] = min(_timed(lambda: generate(model, prompts, 64, cache_len=slots, **greedy))[1]
                             for _ in range(a.repeats))
            print(f"{f'64 new tokens, cache {slots} slots':<34}{cap[slots]:>9.3f}{a.batch * 64 / cap[slots]:>10.0f}")
        res["capacity"] = {"seconds_512": cap[512], "seconds_8192": cap[8192], "ratio": cap[8192] / cap[512]}
        print(f"  capacity 8192 / 512: {cap[8192] / cap[512]:.2f}x the time (best of {a.repeats} each)")
    if "recompute" in compare:
        width = dict(use_cache=False)
        generate(model, prompts, a.new_tokens, temperature=0, eos_token_id=list(range(a.vocab)), **width)
        ro, rdt = _timed(lambda: generate(model, prompts, a.new_tokens, **greedy, **width))
        same = int(sum(np.array_equal(x, y) for x, y in zip(out.tokens, ro.tokens)))
        res["recompute"] = {"seconds": rdt, "tokens_per_s": a.batch * a.new_tokens / rdt, "rows_identical": same}
        print(f"{'ms_llm without a cache':<34}{rdt:>9.2f}{a.batch * a.new_tokens / rdt:>10.1f}")
        print(f"  KV cache / recompute: {rdt / dt:.2f}x; greedy rows identical: {same}/{a.batch}")
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "results": res}, f, indent=1)
    return res
