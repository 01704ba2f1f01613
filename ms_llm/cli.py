# SPDX-License-Identifier: Apache-2.0
"""`ms-llm <command> ...`: one table of commands, each a function taking its argument list.

User errors (MsLlmError) print one line on stderr and exit with code 2; storage that refuses a write (disk
full, quota, read-only, I/O error) prints one line naming the file and exits with code 3 (ms_llm.storage).
"""
import argparse
import importlib
import json
import logging
import os
import sys

from ms_llm import storage
from ms_llm.config import help_text, load_config
from ms_llm.config.registry import STAGE_NAMES
from ms_llm.data import shard_index
from ms_llm.data.chat import render, stop_token_ids
from ms_llm.data.synthetic import synthesize
from ms_llm.data.tokenizer import Tokenizer, train_sentencepiece
from ms_llm.errors import MsLlmError
from ms_llm.eval.cli import main as eval_main
from ms_llm.fileio import numbered_lines, read_json, read_text, utf8
from ms_llm import launch
from ms_llm.launch import main as launch_main
from ms_llm.manifest import write_manifest
from ms_llm.pipeline import load_pipeline, read_state, run_pipeline
from ms_llm.pipeline_report import write_pipeline_report, write_technical_report
from ms_llm.plan import main as plan_main
from ms_llm.stages import run_stage
from ms_llm.training.metrics import plot_metrics


def cmd_convert(argv):
    p = argparse.ArgumentParser(prog="ms-llm convert", description="Convert weights between layouts.")
    p.add_argument("--from", dest="src_format", required=True, choices=["hf", "mindformers"])
    p.add_argument("--to", dest="dst_format", required=True, choices=["hf", "mindformers"])
    p.add_argument("src", help="source model dir (hf) or checkpoint file (mindformers)")
    p.add_argument("dst", help="destination checkpoint file (mindformers) or model dir (hf)")
    p.add_argument("--config", help="Hugging Face config.json describing the model (needed --from mindformers)")
    a = p.parse_args(argv)
    # MindSpore-backed: loads only for the commands that run a model (`ms-llm --help` stays fast)
    from ms_llm.context import setup_context
    from ms_llm.models.convert import convert
    setup_context("pynative")
    print(convert(a.src, a.dst, a.src_format, a.dst_format, a.config))


def cmd_generate(argv):
    p = argparse.ArgumentParser(prog="ms-llm generate", description="Print a completion of a prompt.")
    p.add_argument("--model", required=True, help="model dir, checkpoint dir or run dir")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--tokenizer", help="tokenizer dir or file (default: the model dir)")
    p.add_argument("--chat-template", help="render the prompt as a user turn with this template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    p.add_argument("--json", action="store_true", help="print token ids and log-probs as JSON too")
    a = p.parse_args(argv)
    # MindSpore-backed: loads only for the commands that run a model (`ms-llm --help` stays fast)
    from ms_llm.context import setup_context
    from ms_llm.generation import generate
    from ms_llm.models.io import load_pretrained, resolve_model_dir
    setup_context(a.mode, seed=a.seed)
    model = load_pretrained(a.model)
    tok = Tokenizer.load(a.tokenizer or resolve_model_dir(a.model))
    if a.chat_template:
        prompts = [render([{"role": "user", "content": t}], tok, a.chat_template, add_generation_prompt=True).ids
                   for t in a.prompt]
        eos = stop_token_ids(a.chat_template, tok)
    else:
        prompts = [tok.encode(t, add_bos=True) for t in a.prompt]
        eos = model.config.eos_ids or [tok.eos_id]
    out = generate(model, prompts, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.repetition_penalty,
                   eos_token_id=eos, pad_token_id=tok.pad_id or 0, seed=a.seed)
    for i, text in enumerate(a.prompt):
        toks = out.tokens[i, :int(out.lengths[i])].tolist()
        if toks and toks[-1] in eos:
            toks = toks[:-1]                                  # do not print the stop token
        completion = tok.decode(toks)
        if a.json:
            n = int(out.lengths[i])
            print(json.dumps({"prompt": text, "completion": completion, "tokens": out.tokens[i, :n].tolist(),
                              "logprobs": [round(float(x), 6) for x in out.logprobs[i, :n]]}, ensure_ascii=False))
        else:
            print(completion)


def cmd_tokenizer(argv):
    p = argparse.ArgumentParser(prog="ms-llm tokenizer", description="Train or extend a tokenizer.")
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a SentencePiece BPE model")
    t.add_argument("--input", required=True, action="append", help="text corpus (repeatable)")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", required=True, help="output directory")
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    e = sub.add_parser("expand", help="add frequent domain terms to a model's tokenizer and grow its embeddings "
                                      "(new rows = mean of the rows of the pieces each term used to split into)")
    e.add_argument("--model", required=True, help="model directory (Hugging Face layout or ms_llm run)")
    e.add_argument("--corpus", required=True, action="append", help="text or JSONL ({text}) corpus (repeatable)")
    e.add_argument("--out", required=True, help="output model directory (weights + tokenizer + MANIFEST.json)")
    e.add_argument("--max-terms", type=int, default=100)
    e.add_argument("--min-count", type=int, default=5)
    e.add_argument("--terms", help="file with one term per line instead of mining the corpus")
    e.add_argument("--pad-to-multiple", type=int, default=1, help="round the vocabulary size up (Ascend: 128)")
    a = p.parse_args(argv)
    if a.action == "expand":
        return _tokenizer_expand(a)
    tok = train_sentencepiece(a.input, a.output, a.vocab_size, a.model_type)
    print(f"{a.output}: vocabulary of {tok.vocab_size} tokens")


def cmd_mup(argv):
    p = argparse.ArgumentParser(prog="ms-llm mup", description="μP tools (models/mup.py).")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("coord-check", help="train a few Adam steps at several widths under standard "
                                           "parametrization and μP; plot mean |activation| per width")
    c.add_argument("--widths", default="64,128,256,512,1024", help="comma-separated hidden sizes (multiples of 16)")
    c.add_argument("--steps", type=int, default=5)
    c.add_argument("--lr", type=float, default=1e-2, help="the same Adam learning rate at every width")
    c.add_argument("--base-width", type=int, help="μP base width (default: the smallest width)")
    c.add_argument("--lr-exponent", type=float, default=1.0, help="α: hidden-matrix lr x (base/width)^α")
    c.add_argument("--init-std", type=float, help="σ: every matrix under standard parametrization, the base width "
                                                   "under μP (default 1/√base_width)")
    c.add_argument("--no-zero-readout", action="store_true", help="μP: draw lm_head with std σ instead of zeros")
    c.add_argument("--layers", type=int, default=2)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="mup_coord_check.png", help="PNG to write (the numbers go next to it as .json)")
    w = sub.add_parser("lr-sweep", help="train each width at several learning rates in both parametrizations; "
                                        "plot final loss against lr")
    w.add_argument("--widths", default="64,256")
    w.add_argument("--lrs", default="0.001,0.003,0.01,0.03,0.1")
    w.add_argument("--steps", type=int, default=100)
    w.add_argument("--base-width", type=int)
    w.add_argument("--lr-exponent", type=float, default=1.0)
    w.add_argument("--init-std", type=float)
    w.add_argument("--layers", type=int, default=2)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--out", default="mup_lr_sweep.png")
    a = p.parse_args(argv)
    try:
        widths = sorted({int(w) for w in a.widths.split(",") if w.strip()})
    except ValueError:
        raise MsLlmError(f"--widths: '{a.widths}' is not a comma-separated list of integers") from None
    if len(widths) < 2 or any(w < 16 or w % 16 for w in widths):
        raise MsLlmError(f"--widths: need at least two widths, each a multiple of 16 (head_dim), got {widths}")
    lrs = [a.lr] if a.action == "coord-check" else _floats(a.lrs, "--lrs")
    if a.steps < 1 or min(lrs) <= 0:
        raise MsLlmError("--steps must be at least 1 and learning rates positive")
    # MindSpore-backed: loads only for the commands that run a model (`ms-llm --help` stays fast)
    from ms_llm.bench import coord_check as cc
    from ms_llm.context import setup_context
    setup_context("graph", seed=a.seed)
    settings = cc.CheckSettings(base_width=a.base_width or widths[0], lr_exponent=a.lr_exponent,
                                zero_readout=not getattr(a, "no_zero_readout", False), init_std=a.init_std)
    if a.action == "lr-sweep":
        result = cc.lr_sweep(widths, lrs, a.steps, settings, a.layers, seed=a.seed)
        cc.plot_sweep(result, a.out)
        cc.write_json(result, os.path.splitext(a.out)[0] + ".json")
        print(f"final training loss (mean of the last 10 of {a.steps} steps):")
        print(f"  {'':10s}{'lr':>8s} " + " ".join(f"{'w=' + str(w):>9s}" for w in widths))
        for p in ("sp", "mup"):
            for lr in lrs:
                print(f"  {'μP' if p == 'mup' else 'standard':10s}{lr:8g} "
                      + " ".join(f"{result[p][str(w)][repr(lr)]:9.4f}" for w in widths))
            print(f"  {'':10s}best lr per width: {cc.best_lrs(result, p)}")
        print(f"wrote {a.out}")
        return
    result = cc.coord_check(widths, a.steps, a.lr, settings, a.layers, seed=a.seed)
    cc.plot(result, a.out)
    cc.write_json(result, os.path.splitext(a.out)[0] + ".json")
    print(f"growth of mean |activation| from width {widths[0]} to {widths[-1]} after {a.steps} steps:")
    print(f"  {'activation':24s} {'standard':>10s} {'μP':>10s}")
    for name in result["names"]:
        print(f"  {name:24s} {cc.growth(result, 'sp', name):10.2f} {cc.growth(result, 'mup', name):10.2f}")
    print(f"wrote {a.out}")


def _floats(text: str, flag: str) -> list:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MsLlmError(f"{flag}: '{text}' is not a comma-separated list of numbers") from None


def _corpus_texts(paths):
    for path in paths:
        if not os.path.isfile(path):
            raise MsLlmError(f"{path}: corpus file not found")
        for n, raw, offset in numbered_lines(path):
            try:
                line = utf8(raw, offset)
            except ValueError as e:
                raise MsLlmError(f"{path}:{n}: {e}") from None
            if path.endswith(".jsonl") and line.strip():
                try:
                    yield json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise MsLlmError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
            else:
                yield line


def _tokenizer_expand(a):
    # MindSpore-backed: loads only for the commands that run a model (`ms-llm --help` stays fast)
    from ms_llm.models import load_pretrained, save_pretrained
    from ms_llm.models.io import resolve_model_dir
    from ms_llm.models.vocab import domain_terms, expand_vocabulary
    src = resolve_model_dir(a.model)
    tok = Tokenizer.load(src)
    model = load_pretrained(src)
    if a.terms:
        if not os.path.isfile(a.terms):
            raise MsLlmError(f"{a.terms}: terms file not found")
        lines = read_text(a.terms, "terms file").splitlines()
        terms = [(t.strip(), 0, len(tok.encode(t.strip()))) for t in lines if t.strip()]
    else:
        terms = domain_terms(tok, _corpus_texts(a.corpus), a.max_terms, a.min_count)
    grown, added = expand_vocabulary(model, tok, [t for t, _, _ in terms], a.pad_to_multiple)
    with storage.writing_dir(a.out, "expanded model") as tmp:
        save_pretrained(grown, tmp)
        tok.save(tmp)
        write_manifest(tmp, extra={"expanded_from": src, "added_terms": added})
    pieces = {t: p for t, _, p in terms}
    for t in added:
        print(f"  {t!r}: {pieces[t]} tokens -> 1")
    print(f"{a.out}: {len(added)} terms added; vocabulary {model.config.vocab_size} -> {grown.config.vocab_size}")


def cmd_bench(argv):
    benches = {"generate": "ms_llm.bench.generation", "train": "ms_llm.bench.train", "lora": "ms_llm.bench.train",
               "distill-memory": "ms_llm.bench.distill", "readout-memory": "ms_llm.bench.readout", "layouts": "ms_llm.bench.layouts",
               "ppo-digits": "ms_llm.bench.ppo", "ppo-memory": "ms_llm.bench.ppo",
               "ppo-safety": "ms_llm.bench.ppo_safety",
               "sandbox": "ms_llm.bench.sandbox", "grpo-async": "ms_llm.bench.grpo",
               "kernels": "ms_llm.bench.kernels", "gates": "ms_llm.bench.gates",
               "sft-packing": "ms_llm.bench.packing"}
    if not argv or argv[0] not in benches:
        raise MsLlmError(f"bench: name one of {sorted(benches)} (ms-llm bench NAME [--help])")
    if argv[0] == "lora":           # full fine-tuning vs LoRA on the same model, batch and sequence
        argv = ["train", "--frameworks", "ms_llm,ms_llm_lora", *argv[1:]]
    importlib.import_module(benches[argv[0]]).run(argv[1:])


def cmd_train(argv):
    p = argparse.ArgumentParser(prog="ms-llm train", description="Run the stage a YAML config describes.")
    p.add_argument("config", nargs="?", help="experiment YAML (configs/<family>/<size>_<stage>.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 optim.lr=1e-4")
    p.add_argument("--help-config", action="store_true", help="print every config key with its help and exit")
    a = p.parse_args(argv)
    if a.help_config:
        print(help_text())
        return
    if not a.config:
        p.error("CONFIG is required")
    run_stage(load_config(a.config, a.overrides))


def cmd_distill(argv):
    p = argparse.ArgumentParser(prog="ms-llm distill", description="Distillation utilities.")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("cache-teacher", add_help=False,
                   help="run the teacher once over a distill config's data and write its top-k log-probs to "
                        "distill.cache_dir; with --nproc-per-node N (and `ms-llm launch`'s other flags) on N msrun "
                        "ranks, the teacher split over distill.cache_tensor_parallel of them")
    a, rest = p.parse_known_args(argv)
    la = launch.parse(rest, "ms-llm distill cache-teacher")
    cfg = load_config(la.config, [*la.overrides, *([f"context.device_target={la.device}"] if la.device else [])])
    if cfg.stage != "distill":
        raise MsLlmError(f"{la.config}: stage is '{cfg.stage}'; cache-teacher needs a stage: distill config")
    if la.nproc_per_node * la.nnodes > 1 or la.dry_run:
        return launch.main(rest, "cache-teacher", "ms-llm distill cache-teacher")
    # MindSpore-backed: loads only for the commands that run a model (`ms-llm --help` stays fast)
    from ms_llm.stages.distill import cache_teacher
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(cache_teacher(cfg)))


def cmd_rlhf(argv):
    p = argparse.ArgumentParser(prog="ms-llm rlhf", description="RLHF utilities.")
    sub = p.add_subparsers(dest="action", required=True)
    i = sub.add_parser("audit-import", help="add the reviewed problems of an audit round to a preference pool as "
                                            "new pairs under its next version")
    i.add_argument("file", help="a reviewed audit/round_K.jsonl")
    i.add_argument("--pool", required=True, help="the preference pool folder (pairs.jsonl + MANIFEST.json)")
    st = sub.add_parser("audit-status", help="list a PPO run's audit rounds; overdue ones are flagged")
    st.add_argument("run_dir")
    st.add_argument("--review-hours", type=float, default=48.0)
    a = p.parse_args(argv)
    # MindSpore-backed: loads only for the commands that run a model (`ms-llm --help` stays fast)
    from ms_llm.rollout.audit import audit_status, import_reviews
    if a.action == "audit-import":
        print(json.dumps(import_reviews(a.file, a.pool)))
    else:
        for row in audit_status(a.run_dir, a.review_hours):
            print(json.dumps(row))


def cmd_data(argv):
    p = argparse.ArgumentParser(prog="ms-llm data", description="Data utilities.")
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("synth", help="write the deterministic synthetic datasets and their tokenizer")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-text", type=int, default=2000, help="documents per pretraining domain")
    s.add_argument("--n-sft", type=int, default=2000, help="instruction records")
    s.add_argument("--vocab-size", type=int, default=512)
    x = sub.add_parser("index", help="tokenize text JSONL into a shard index with a domain tag on every shard")
    x.add_argument("inputs", nargs="+", metavar="PATH[:DOMAIN]",
                   help="text JSONL; records without a 'domain' field get DOMAIN (default: general)")
    x.add_argument("--tokenizer", required=True, help="tokenizer dir or file")
    x.add_argument("--out", required=True, help="index directory to create")
    x.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard (documents are not split)")
    x.add_argument("--on-error", default="raise", choices=["raise", "skip"], help="a malformed record: stop or skip")
    x.add_argument("--overwrite", action="store_true", help="replace an existing index directory")
    v = sub.add_parser("verify-index", help="check every shard of an index against its SHA256")
    v.add_argument("index")
    v.add_argument("--tokenizer", required=True)
    a = p.parse_args(argv)
    if a.action in ("index", "verify-index"):
        return _data_index(a)
    manifest = synthesize(a.out, a.seed, a.n_text, a.n_sft, vocab_size=a.vocab_size)
    print(f"{a.out}: {len(manifest['files'])} files, version {manifest['version']}")


def _data_index(a):
    tok = Tokenizer.load(a.tokenizer)
    if a.action == "verify-index":
        shards = shard_index.open_index(a.index, tok, verify=True)
        print(f"{a.index}: {len(shards)} shards match their SHA256")
        return
    index = shard_index.build_index([shard_index.parse_input(i) for i in a.inputs], tok, a.out, a.shard_tokens,
                                    a.on_error, a.overwrite)
    print(f"{a.out}: {len(index['shards'])} shards")
    for d, v in index["domains"].items():
        print(f"  {d:16s} {v['shards']:5d} shards {v['tokens']:12d} tokens {v['docs']:9d} documents")
    skipped = sum(s["skipped"] for s in index["sources"])
    if skipped:
        print(f"  skipped {skipped} malformed records (see index.json)")


def cmd_eval(argv):
    eval_main(argv)


def cmd_plan(argv):
    return plan_main(argv)


def cmd_launch(argv):
    rc = launch_main(argv)
    if rc:
        sys.exit(rc)


def cmd_merge_lora(argv):
    p = argparse.ArgumentParser(prog="ms-llm merge-lora", description="Fold a LoRA adapter into its base model.")
    p.add_argument("--base", required=True, help="base model dir (Hugging Face layout or ms_llm run/checkpoint)")
    p.add_argument("--adapter", required=True, help="adapter dir (adapter_model.safetensors + adapter_config.json)")
    p.add_argument("--out", required=True, help="output model dir")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max logit difference accepted")
    a = p.parse_args(argv)
    # MindSpore-backed: loads only for the commands that run a model (`ms-llm --help` stays fast)
    from ms_llm.context import setup_context
    from ms_llm.peft.lora import merge_and_verify
    setup_context("pynative")
    diff = merge_and_verify(a.base, a.adapter, a.out, a.tolerance)
    print(f"{a.out}: merged (scaling alpha/r); max logit difference vs base + adapter {diff:.2e}")


def cmd_pipeline(argv):
    p = argparse.ArgumentParser(prog="ms-llm pipeline", description="Run the stages a pipeline YAML names, in "
                                "order, with hash-checked hand-offs, gates and resume (ms_llm/pipeline.py).")
    p.add_argument("config", help="pipeline YAML (configs/tiny/pipeline.yaml)")
    p.add_argument("overrides", nargs="*", help="output_dir=DIR, gate_policy=stop|warn, or STAGE.section.key=value")
    p.add_argument("--technical", action="store_true", help="also write technical_report.md at the end")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage (the rest stay pending)")
    a = p.parse_args(argv)
    pipe = load_pipeline(a.config, a.overrides)

    def say(line):
        print(line, flush=True)
    rc = run_pipeline(pipe, say, a.until)
    if a.technical:
        write_technical_report(pipe.output_dir)
    say(f"report: {os.path.join(pipe.output_dir, 'report.md')}")
    return rc


def cmd_report(argv):
    p = argparse.ArgumentParser(prog="ms-llm report", description="Rebuild a run's report.md and plots, or a "
                                "pipeline's (its directory holds pipeline.json); --technical writes a pipeline's "
                                "technical_report.md in seed 001's outline from its records.")
    p.add_argument("run_dir")
    p.add_argument("--technical", action="store_true", help="write PIPELINE_DIR/technical_report.md")
    a = p.parse_args(argv)
    if os.path.isfile(os.path.join(a.run_dir, "pipeline.json")):
        print(write_pipeline_report(a.run_dir, read_state(a.run_dir)))
        if a.technical:
            print(write_technical_report(a.run_dir))
        return
    if a.technical:
        raise MsLlmError(f"{a.run_dir}: no pipeline.json; --technical reads a pipeline directory (ms-llm pipeline)")
    # MindSpore-backed: loads only for the commands that run a model (`ms-llm --help` stays fast)
    from ms_llm.stages.common import write_report
    path = os.path.join(a.run_dir, "summary.json")
    if not os.path.isfile(path):
        raise MsLlmError(f"{path}: not found; is {a.run_dir} a run directory of a finished (or stopped) stage?")
    summary = read_json(path, "the run summary")
    plots = plot_metrics(a.run_dir)
    write_report(a.run_dir, summary)
    print(f"{os.path.join(a.run_dir, 'report.md')} ({len(plots)} plots)")


COMMANDS = {                    # name: (function, one line for `ms-llm --help`)
    "train": (cmd_train, f"run the stage a YAML config describes ({', '.join(STAGE_NAMES)})"),
    "pipeline": (cmd_pipeline, "run a chain of stages (distill -> cpt -> sft -> reward -> ppo) with gates and resume"),
    "launch": (cmd_launch, "start a config on several workers with msrun (CPU or Ascend), or print the command"),
    "plan": (cmd_plan, "memory per rank of a config, by component, against the device's budget"),
    "eval": (cmd_eval, "evaluate a model: humaneval, mc, ppl, em, rm (reward model)"),
    "generate": (cmd_generate, "print a model's completion of a prompt"),
    "data": (cmd_data, "make the synthetic datasets, or index domain-tagged token shards"),
    "tokenizer": (cmd_tokenizer, "train a tokenizer, or add frequent domain terms to a model's"),
    "distill": (cmd_distill, "distillation tools: cache a teacher's top-k log-probs"),
    "convert": (cmd_convert, "convert weights between Hugging Face and MindFormers layouts"),
    "merge-lora": (cmd_merge_lora, "fold a LoRA adapter into its base model (verified)"),
    "report": (cmd_report, "rebuild a run directory's report.md and plots"),
    "bench": (cmd_bench, "side-by-side measurements: train, lora, generate, distill-memory, readout-memory, layouts, ppo-digits, "
                         "ppo-memory, ppo-safety, sandbox, grpo-async, kernels, gates, sft-packing"),
    "rlhf": (cmd_rlhf, "RLHF audit loop: audit-import reviewed rounds into the preference pool, audit-status"),
    "mup": (cmd_mup, "μP tools: coordinate check and learning-rate sweep across widths"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: ms-llm COMMAND [ARGS ...]     (ms-llm COMMAND --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"error: unknown command '{argv[0]}'", file=sys.stderr)
        return 2
    try:
        rc = COMMANDS[argv[0]][0](argv[1:])
    except MsLlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except storage.WriteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return storage.EXIT_STATUS
    except OSError as e:                  # storage failing outside a guarded write (metrics, reports): one line too
        if e.errno not in storage.IO_ERRORS:
            raise
        print(f"error: {storage.write_failed(e, argv[0], e.filename or os.getcwd())}", file=sys.stderr)
        return storage.EXIT_STATUS
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0     # pipeline: 1 when a stage stopped it


if __name__ == "__main__":
    sys.exit(main())
