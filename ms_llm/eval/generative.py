# SPDX-License-Identifier: Apache-2.0
"""Perplexity per domain, generation exact-match with answer extraction, and judged win-rate."""
import math
import re
import threading
from collections import defaultdict

import mindspore as ms
import numpy as np

from ms_llm.data.chat import render, stop_token_ids
from ms_llm.data.readers import read_records
from ms_llm.eval.sandbox import run_program, run_programs
from ms_llm.eval.scoring import sequence_logprobs
from ms_llm.errors import MsLlmError
from ms_llm.generation import generate


def perplexity(model, tokenizer, path: str, seq_len: int = 256, batch_size: int = 8, max_docs: int = None) -> dict:
    """Token-level perplexity of a text JSONL file, overall and per `domain` field.

    Documents (each + eos) are scored in windows of at most `seq_len` tokens.
    """
    records = read_records(path, "text")[:max_docs]
    windows = []
    for r in records:
        ids = tokenizer.encode(r["text"], add_bos=True, add_eos=True)
        for s in range(0, max(1, len(ids) - 1), seq_len):
            chunk = ids[s:s + seq_len + 1]
            if len(chunk) > 1:
                windows.append((r.get("domain") or "all", chunk))
    nll, count = defaultdict(float), defaultdict(int)
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        for (domain, _), lp in zip(batch, sequence_logprobs(model, [w for _, w in batch])):
            nll[domain] -= float(lp.sum())
            count[domain] += len(lp)
    per = {d: math.exp(nll[d] / count[d]) for d in sorted(nll)}
    total = math.exp(sum(nll.values()) / max(1, sum(count.values())))
    return {"perplexity": total, "domains": per, "tokens": int(sum(count.values()))}


def extract_answer(text: str, style: str = "auto") -> str:
    """The final answer in a generation: GSM8K '#### 42', else (auto/number) the last number, else the text."""
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    if m:
        return m.group(1).replace(",", "")
    if style in ("auto", "number"):
        m = re.search(r"answer is\s*(-?[\d,]*\.?\d+)", text)
        nums = re.findall(r"-?\d[\d,]*\.?\d*", text)
        if m:
            return m.group(1).replace(",", "")
        if style == "number" and nums:
            return nums[-1].replace(",", "").rstrip(".")
    return text.strip().split("\n")[0].strip()


def math_equal(text: str, answer: str):
    """Does the completion state the reference answer, as Hugging Face's math-verify judges it (LaTeX and plain
    forms, \\boxed{}, fractions vs decimals, sets, intervals)? None when math-verify finds no mathematical
    answer in the reference, so the caller can fall back to extract_answer."""
    try:
        # math-verify is optional (the math extra): imported when answer_style is math
        from math_verify import parse, verify
    except ImportError:
        raise MsLlmError("answer_style math needs the math-verify package: pip install 'ms_llm[math]'") from None
    # math-verify times out through SIGALRM, which only the main thread may set
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(str(answer), parsing_timeout=timeout)
    if not gold:
        return None
    return bool(verify(gold, parse(text, parsing_timeout=timeout), timeout_seconds=timeout))


def answers_agree(text: str, answer, style: str = "auto") -> bool:
    """exact_match's verdict: the answers extracted from both sides are equal; with style "math", math-verify
    decides wherever it reads a mathematical reference answer."""
    if style == "math":
        verdict = math_equal(text, str(answer))
        if verdict is not None:
            return verdict
        style = "auto"
    return extract_answer(text, style).strip() == extract_answer(str(answer), style).strip()


def extract_code(text: str) -> str:
    """MBPP-style: the first fenced code block, else the text itself."""
    m = re.search(r"```(?:python)?\n(.*?)```", text, re.S)
    return m.group(1) if m else text


def chat_answers(model, tokenizer, conversations: list, template: str = "chatml", max_new_tokens: int = 32,
                 batch_size: int = 16, tools: list = None) -> list:
    """Greedy assistant answers (text, end-of-turn token removed) to each list of chat messages; `tools`, one
    list of tool schemas per conversation, go into each prompt the way the template writes tools."""
    stops = stop_token_ids(template, tokenizer)
    tools = tools or [None] * len(conversations)
    answers = []
    for i in range(0, len(conversations), batch_size):
        ids = [render(msgs, tokenizer, template, add_generation_prompt=True, tools=t).ids
               for msgs, t in zip(conversations[i:i + batch_size], tools[i:i + batch_size])]
        out = generate(model, ids, max_new_tokens, temperature=0, eos_token_id=stops, pad_token_id=tokenizer.pad_id)
        for j in range(len(ids)):
            toks = out.tokens[j, :out.lengths[j]].tolist()
            if toks and toks[-1] in stops:
                toks = toks[:-1]                              # the end-of-turn token is not part of the answer
            answers.append(tokenizer.decode(toks))
    return answers


def exact_match(model, tokenizer, records: list, template: str = "chatml", max_new_tokens: int = 32,
                style: str = "auto", batch_size: int = 16) -> dict:
    """Greedy answers to prompt records ({"prompt", "answer", "task"?}); accuracy overall and per task."""
    hits, per_task, outputs = [], defaultdict(list), []
    texts = chat_answers(model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in records], template,
                         max_new_tokens, batch_size)
    for r, text in zip(records, texts):
        got = extract_answer(text, "auto" if style == "math" else style)
        ref = str(r["answer"]).strip()
        ok = (math_equal(text, ref) if style == "math" else None)
        if ok is None:
            ok = got == ref or " ".join(text.split()) == " ".join(ref.split())   # whole answer, whitespace-normalized
        hits.append(ok)
        per_task[r.get("task") or "all"].append(ok)
        outputs.append({"prompt": r["prompt"], "answer": r["answer"], "output": text, "extracted": got, "correct": ok})
    return {"accuracy": float(np.mean(hits)) if hits else 0.0,
            "tasks": {t: float(np.mean(h)) for t, h in sorted(per_task.items())}, "n": len(hits), "outputs": outputs}


def functional_program(candidate: str, reference: str, inputs=range(-5, 6)):
    """A program that passes when the candidate defines the reference's function with the same outputs on
    `inputs`; None when the reference defines no function."""
    m = re.search(r"def\s+(\w+)\s*\(", reference)
    if not m:
        return None
    fn = m.group(1)
    return (f"{extract_code(candidate)}\n_cand = {fn}\n{reference}\n_ref = {fn}\n"
            f"for _x in {list(inputs)!r}:\n    assert _cand(_x) == _ref(_x), _x\n")


def functional_check(candidate: str, reference: str, inputs=range(-5, 6), timeout: float = 3.0,
                     isolation: str = "namespaces") -> bool:
    """Does the candidate define the reference's function with the same outputs on `inputs`? (sandboxed)"""
    program = functional_program(candidate, reference, inputs)
    return program is not None and run_program(program, timeout=timeout, isolation=isolation).status == "passed"


def code_pass_at_1(outputs: list, isolation: str = "namespaces", timeout: float = 3.0) -> float:
    """pass@1 of greedy code answers (exact_match outputs whose reference defines a function), run in the
    sandbox on all available cores."""
    programs = [functional_program(o["output"], str(o["answer"])) for o in outputs]
    programs = [p for p in programs if p is not None]
    if not programs:
        return float("nan")
    runs = run_programs(programs, timeout=timeout, isolation=isolation)
    return float(np.mean([r.status == "passed" for r in runs]))


def bertscore(model, tokenizer, candidates: list, references: list, layer: str = "hidden") -> np.ndarray:
    """BERTScore F1 (Zhang et al. 2020) with a chosen model's token vectors.

    layer="hidden": the final hidden states (contextual embeddings, as in the paper); layer="embedding": the
    input token embeddings (what the distillation filter uses: a soft token overlap that a small model's
    contextual states would blur). Each token of one text is matched to its most similar token (cosine) of
    the other; precision averages over the candidate's tokens, recall over the reference's, F1 is their
    harmonic mean. Cosines can be negative: precision and recall below 0 count as 0 (no match), so F1 stays in
    [0, 1] (a harmonic mean of a positive and a negative value is not a score). [N] float.
    """
    table = model.model.embed_tokens.weight.asnumpy().astype(np.float64) if layer == "embedding" else None

    def embed(text):
        ids = tokenizer.encode(text) or [tokenizer.eos_id]
        if table is not None:
            h = table[np.asarray(ids)]
        else:
            model.set_train(False)
            h = model.hidden_states(ms.Tensor([ids], ms.int32)).asnumpy()[0].astype(np.float64)
        return h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
    scores = []
    for c, r in zip(candidates, references):
        sim = embed(c) @ embed(r).T
        p, rec = max(sim.max(1).mean(), 0.0), max(sim.max(0).mean(), 0.0)
        scores.append(2 * p * rec / (p + rec) if p + rec > 0 else 0.0)
    return np.array(scores)


def dialogue_coherence(model, tokenizer, dialogues: list, template: str = "chatml", max_new_tokens: int = 32) -> dict:
    """Topic consistency between turns (seed 000 §1.2.5.3.3): the model answers every user turn of a held-out
    dialogue given the reference history, and each answer is scored with BERTScore F1 against the previous
    exchange (user question + answer). Returns the mean and the per-dialogue scores."""
    stops = stop_token_ids(template, tokenizer)
    per_dialogue = []
    for msgs in dialogues:
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        answers, previous = [], []
        for k, i in enumerate(turns[1:], 1):
            prompt = render(msgs[:i], tokenizer, template, add_generation_prompt=True).ids
            out = generate(model, [prompt], max_new_tokens, temperature=0, eos_token_id=stops,
                           pad_token_id=tokenizer.pad_id)
            toks = [t for t in out.tokens[0, :out.lengths[0]].tolist() if t not in stops]
            answers.append(tokenizer.decode(toks))
            j = turns[k - 1]
            previous.append(msgs[j - 1]["content"] + " " + msgs[j]["content"])
        if answers:
            per_dialogue.append(float(bertscore(model, tokenizer, answers, previous).mean()))
    return {"coherence": float(np.mean(per_dialogue)) if per_dialogue else float("nan"), "dialogues": per_dialogue}


def win_rate(prompts: list, answers_a: list, answers_b: list, judge) -> dict:
    """How often A beats B under `judge(prompt, first, second) -> 1 | 0.5 | 0` (1: first is better).

    Each pair is judged in both orders and the two verdicts averaged, which cancels a judge's preference
    for a position (as AlpacaEval does).
    """
    scores, bias = [], []
    for p, a, b in zip(prompts, answers_a, answers_b):
        ab, ba = judge(p, a, b), judge(p, b, a)
        scores.append((ab + (1 - ba)) / 2)
        bias.append((ab + ba) / 2 - 0.5)          # > 0: the judge prefers whatever comes first
    return {"win_rate": float(np.mean(scores)) if scores else 0.0, "n": len(scores),
            "position_bias": float(np.mean(bias)) if bias else 0.0}


def score_judge(score_fn):
    """A judge from a scalar scorer (a reward model or a rule): the higher-scoring answer wins, ties 0.5."""
    def judge(prompt, first, second):
        a, b = score_fn(prompt, first), score_fn(prompt, second)
        return 1.0 if a > b else 0.0 if a < b else 0.5
    return judge
