# SPDX-License-Identifier: Apache-2.0
"""KV-cache decoding vs full recomputation: `ms-llm bench generate [--new-tokens 256]`.

Both paths run in GRAPH_MODE on the same random model and prompts, each warmed up first (compilation is
excluded); the recomputation path uses one fixed-width buffer, so it also compiles once. Prints tokens/s of
each and their ratio.
"""
import argparse
import json
import time

import numpy as np


def run(argv=None):
    p = argparse.ArgumentParser(prog="ms-llm bench generate")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    a = p.parse_args(argv)
    # MindSpore only in the process that runs the MindSpore side
    from ms_llm.context import setup_context
    from ms_llm.generation import generate
    from ms_llm.models import CausalLM, preset
    setup_context("graph", seed=0)
    cfg = preset("tiny", hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.75), num_hidden_layers=a.layers,
                 num_attention_heads=max(4, a.hidden // 64), num_key_value_heads=max(2, a.hidden // 128),
                 vocab_size=a.vocab, max_position_embeddings=a.prompt_len + a.new_tokens + 64)
    model = CausalLM(cfg)
    prompts = np.random.RandomState(0).randint(3, a.vocab, (a.batch, a.prompt_len)).tolist()
    cache_len = -(-(a.prompt_len + a.new_tokens) // 64) * 64
    runs = {"cached": dict(use_cache=True, cache_len=cache_len), "recompute": dict(use_cache=False)}
    results = {}
    for name, kw in runs.items():
        # compile first, at the timed run's shapes: the cached path needs its prompt and one-token graphs at
        # this cache length; the recompute path one forward at full width (every token is eos -> one step)
        if name == "cached":
            generate(model, prompts, 4, temperature=0, eos_token_id=-1, **kw)
        else:
            generate(model, prompts, a.new_tokens, temperature=0, eos_token_id=list(range(a.vocab)), **kw)
        t0 = time.perf_counter()
        out = generate(model, prompts, a.new_tokens, temperature=0, eos_token_id=-1, **kw)
        dt = time.perf_counter() - t0
        results[name] = {"seconds": dt, "tokens_per_s": a.batch * a.new_tokens / dt, "out": out}
    ca, re_ = results["cached"]["out"], results["recompute"]["out"]
    rows_same = int(sum(np.array_equal(x, y) for x, y in zip(ca.tokens, re_.tokens)))
    # a random model's distribution is nearly flat, so two argmaxes can swap at a float near-tie; up to the
    # first differing token the log-probs must agree
    agree = [np.abs(ca.logprobs[i, :_first_diff(ca.tokens[i], re_.tokens[i])] -
                    re_.logprobs[i, :_first_diff(ca.tokens[i], re_.tokens[i])]).max() for i in range(a.batch)]
    ratio = results["cached"]["tokens_per_s"] / results["recompute"]["tokens_per_s"]
    print(f"model: hidden {a.hidden}, {a.layers} layers, vocab {a.vocab} ({cfg.num_parameters() / 1e6:.1f}M params); "
          f"batch {a.batch}, prompt {a.prompt_len}, {a.new_tokens} new tokens, GRAPH_MODE CPU")
    print(f"{'path':<12}{'seconds':>10}{'tokens/s':>12}")
    for name in ("cached", "recompute"):
        r = results[name]
        print(f"{name:<12}{r['seconds']:>10.2f}{r['tokens_per_s']:>12.1f}")
    print(f"speed-up (cached / recompute): {ratio:.2f}x; greedy rows identical: {rows_same}/{a.batch}; "
          f"max |logprob diff| before any divergence: {max(agree):.2e}")
    print(json.dumps({"cached_tokens_per_s": results["cached"]["tokens_per_s"],
                      "recompute_tokens_per_s": results["recompute"]["tokens_per_s"], "ratio": ratio,
                      "rows_identical": rows_same}))
    return ratio


def _first_diff(x, y) -> int:
    d = np.nonzero(x != y)[0]
    return int(d[0]) if len(d) else len(x)
