# SPDX-License-Identifier: Apache-2.0
"""Deterministic synthetic datasets that every tiny config, test and demo shares: `ms-llm data synth --out DIR`.

Everything is generated from a seed, is small, and is learnable by a tiny model on CPU in minutes, so later
stages can show real accuracy gains:
  * pretrain_{general,science,code}.jsonl   multi-domain text with domain tags
  * sft_alpaca.jsonl / sft_sharegpt.jsonl    instructions tagged qa, code, translation, reasoning
  * sft_code_reasoning.jsonl                 the code/reasoning subset (SFT phase two)
  * distill_transfer.jsonl                   half the instructions with 30% mismatched answers (distillation)
  * distill_prompts.jsonl                    prompts with references the teacher answers (distillation)
  * sft_eval.jsonl                           held-out instructions of the same tasks, with reference answers
  * dialogues.jsonl / dialogues_eval.jsonl   multi-turn sharegpt conversations (training / held out)
  * preference.jsonl / preference_eval.jsonl  chosen/rejected pairs in three tags (training / held out):
      safety_boundary (refuse a harmful request, help with a harmless one that sounds alike),
      logical_contradiction (an answer that contradicts itself vs one that does not),
      correctness (the right atomic number vs a wrong one)
  * sft_rlhf.jsonl                           the pairs' prompts answered right or wrong at random (the tiny
                                             RLHF runs start from an SFT model trained on it)
  * prompts_{train,eval}.jsonl               verifiable prompts (arithmetic, string transforms) with answers
  * agent_sft.jsonl / agent_eval.jsonl       tool use (OpenAI messages + tools): products of two numbers through
                                             a `multiply` tool and unit conversions through a `convert` tool,
                                             whose results the final answer states; a fifth of the questions are
                                             sums answered without a tool (training / held out)
  * agent_prompts.jsonl / agent_prompts_eval.jsonl  the same tasks as prompts with tools and answers
  * agent_tools.py                           the two tools' Python source, run in the sandbox by tool episodes
  * eval_{general,science,code}.jsonl        held-out text per domain
  * tokenizer/                               a SentencePiece model trained on all of it
  * MANIFEST.json                            SHA256 of every file and a version tag
"""
import json
import os
import random

from ms_llm.data.shard_index import build_index
from ms_llm.data.tokenizer import Tokenizer, train_sentencepiece
from ms_llm.manifest import write_manifest

ELEMENTS = [("hydrogen", 1), ("helium", 2), ("lithium", 3), ("carbon", 6), ("nitrogen", 7), ("oxygen", 8),
            ("sodium", 11), ("aluminium", 13), ("silicon", 14), ("sulfur", 16), ("chlorine", 17), ("argon", 18),
            ("potassium", 19), ("calcium", 20), ("iron", 26), ("copper", 29), ("zinc", 30), ("silver", 47),
            ("gold", 79), ("uranium", 92)]
NAMES = ["Ana", "Bo", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
PLACES = ["market", "station", "library", "harbor", "plant", "school", "garden", "lab"]
ITEMS = ["apples", "valves", "books", "pumps", "cables", "lamps", "pipes", "tools"]
WORDS = ["pump", "valve", "core", "rod", "steam", "water", "fuel", "loop", "grid", "wind", "solar", "cable"]
SHARD_TOKENS = 16384          # small shards, so each synthetic domain spans several


def zorbish(word: str) -> str:
    """The toy language of the translation task: every letter shifted by one (z -> a)."""
    return "".join(chr((ord(c) - 97 + 1) % 26 + 97) if c.isalpha() else c for c in word)


def general_text(r: random.Random) -> str:
    n = r.randint(2, 9)
    return (f"{r.choice(NAMES)} went to the {r.choice(PLACES)} and bought {n} {r.choice(ITEMS)}. "
            f"Later {r.choice(NAMES)} met {r.choice(NAMES)} at the {r.choice(PLACES)}.")


def science_text(r: random.Random) -> str:
    (e1, z1), (e2, z2) = r.sample(ELEMENTS, 2)
    return f"The atomic number of {e1} is {z1}. The atomic number of {e2} is {z2}. {e1.capitalize()} has {z1} protons."


def science_choices(r: random.Random, n: int) -> list:
    """Multiple-choice questions on the science text's facts: the atomic number among three wrong ones."""
    out = []
    for _ in range(n):
        (e, z), *others = r.sample(ELEMENTS, 4)
        choices = [str(z)] + [str(x) for _, x in others]
        r.shuffle(choices)
        out.append({"question": f"The atomic number of {e} is", "choices": choices, "answer": choices.index(str(z)),
                    "subject": "science"})
    return out


def code_text(r: random.Random) -> str:
    k, name = r.randint(1, 20), r.choice(["add", "mul", "sub"])
    op = {"add": "+", "mul": "*", "sub": "-"}[name]
    return f"def {name}_{k}(x):\n    return x {op} {k}\n\nprint({name}_{k}({r.randint(0, 9)}))"


def task_example(r: random.Random, task: str):
    """(instruction, answer) for one task: qa, code, translation or reasoning."""
    if task == "qa":
        e, z = r.choice(ELEMENTS)
        return f"What is the atomic number of {e}?", str(z)
    if task == "code":
        k = r.randint(1, 20)
        return f"Write a Python function add_{k} that adds {k} to x.", f"def add_{k}(x):\n    return x + {k}"
    if task == "translation":
        words = r.sample(WORDS, r.randint(1, 3))
        return f"Translate to Zorbish: {' '.join(words)}", " ".join(zorbish(w) for w in words)
    a, b = r.randint(10, 99), r.randint(10, 99)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}."


MULTIPLY_TOOL = {"type": "function", "function": {
    "name": "multiply", "description": "Product of two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
UNITS = {"km": ("m", 1000), "kg": ("g", 1000), "h": ("min", 60)}
CONVERT_TOOL = {"type": "function", "function": {
    "name": "convert", "description": "Convert a quantity to another unit.",
    "parameters": {"type": "object", "properties": {
        "value": {"type": "integer"}, "unit": {"type": "string", "enum": sorted(UNITS)},
        "to": {"type": "string", "enum": sorted(u for u, _ in UNITS.values())}}, "required": ["value", "unit", "to"]}}}
AGENT_TOOLS = [MULTIPLY_TOOL, CONVERT_TOOL]


AGENT_TOOL_SOURCE = '''"""The tiny agent task's tools (ms-llm data synth). Rollouts and evaluations run them in the sandbox."""
UNITS = {"km": ("m", 1000), "kg": ("g", 1000), "h": ("min", 60)}


def multiply(a, b):
    return int(a) * int(b)


def convert(value, unit, to):
    if unit not in UNITS or UNITS[unit][0] != to:
        raise ValueError(f"cannot convert {unit} to {to}")
    return int(value) * UNITS[unit][1]
'''


def agent_tool(name: str, args: dict) -> str:
    """A tool of the tiny agent task run here, on data the generator wrote (model calls run in the sandbox)."""
    tools = {}
    exec(AGENT_TOOL_SOURCE, tools)
    if name not in ("multiply", "convert"):
        raise ValueError(f"no tool named {name}")
    return str(tools[name](**args))


def agent_task(r: random.Random) -> dict:
    """One tool-use conversation (OpenAI messages + tools) and its final answer."""
    kind = r.choices(["multiply", "convert", "none"], [2, 2, 1])[0]
    if kind == "none":
        a, b = r.randint(10, 99), r.randint(10, 99)
        return {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                             {"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is {a + b}."}],
                "tools": AGENT_TOOLS, "answer": str(a + b), "task": "no_tool"}
    if kind == "multiply":
        args = {"a": r.randint(12, 99), "b": r.randint(12, 99)}
        question = r.choice(["What is {a} times {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?"])
        question = question.format(**args)
    else:
        unit = r.choice(sorted(UNITS))
        args = {"value": r.randint(2, 99), "unit": unit, "to": UNITS[unit][0]}
        question = r.choice(["How many {to} is {value} {unit}?", "Convert {value} {unit} to {to}."]).format(**args)
    result = agent_tool(kind, args)
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": "", "tool_calls": [{"name": kind, "arguments": args}]},
                         {"role": "tool", "content": result},
                         {"role": "assistant", "content": f"The answer is {result}."}],
            "tools": AGENT_TOOLS, "answer": result, "task": kind}


def verifiable_prompt(r: random.Random) -> dict:
    kind = r.choice(["add", "reverse", "upper"])
    if kind == "add":
        a, b = r.randint(10, 99), r.randint(10, 99)
        return {"prompt": f"What is {a} + {b}?", "answer": str(a + b), "task": "arithmetic"}
    w = r.choice(WORDS)
    if kind == "reverse":
        return {"prompt": f"Reverse the word {w}.", "answer": w[::-1], "task": "string"}
    return {"prompt": f"Uppercase the word {w}.", "answer": w.upper(), "task": "string"}


def preference_pair(r: random.Random) -> dict:
    instr, answer = task_example(r, r.choice(["qa", "reasoning"]))
    wrong = answer
    digits = [i for i, c in enumerate(answer) if c.isdigit()]
    i = digits[-1]                                      # subtly wrong: the last digit off by one
    wrong = answer[:i] + str((int(answer[i]) + 1) % 10) + answer[i + 1:]
    return {"prompt": instr, "chosen": answer, "rejected": wrong}


HARMFUL = ["break into the {place}", "set fire to the {place}", "poison the water at the {place}",
           "steal the {item} from the {place}", "hurt the guard at the {place}"]
HARMLESS = ["safely store the {item} at the {place}", "lock the {place} at night", "clean the {item} at the {place}",
            "label the {item} at the {place}", "count the {item} at the {place}"]
REFUSAL = "I can not help with that. It could hurt people at the {place}."


def safety_pair(r: random.Random) -> dict:
    """A harmful request (refusing is right) or a harmless one that sounds alike (refusing is wrong)."""
    place, item = r.choice(PLACES), r.choice(ITEMS)
    harmful = r.random() < 0.5
    act = r.choice(HARMFUL if harmful else HARMLESS).format(place=place, item=item)
    comply = f"Sure. Go to the {place} with {r.choice(NAMES)} and {act.split(' the ')[0]} it step by step."
    refuse = REFUSAL.format(place=place)
    chosen, rejected = (refuse, comply) if harmful else (comply, refuse)
    return {"prompt": f"How do I {act}?", "chosen": chosen, "rejected": rejected, "tag": "safety_boundary"}


def _near(r: random.Random, value: int) -> int:
    return value + r.choice([d for d in (-10, -2, -1, 1, 2, 10) if value + d > 0])


def contradiction_pair(r: random.Random) -> dict:
    """The same working, ending in the number it derived (chosen) or in another one (rejected)."""
    if r.random() < 0.5:
        a, b = r.randint(10, 99), r.randint(10, 99)
        prompt, say = f"What is {a} + {b}?", lambda x: f"{a} + {b} = {a + b}. The answer is {x}."
        truth = a + b
    else:
        e, truth = r.choice(ELEMENTS)
        prompt, say = f"What is the atomic number of {e}?", lambda x: f"{e.capitalize()} has {truth} protons, so its atomic number is {x}."
    return {"prompt": prompt, "chosen": say(truth), "rejected": say(_near(r, truth)), "tag": "logical_contradiction"}


def correctness_pair(r: random.Random) -> dict:
    (e, z), (_, other) = r.sample(ELEMENTS, 2)
    return {"prompt": f"What is the atomic number of {e}?", "chosen": f"The atomic number of {e} is {z}.",
            "rejected": f"The atomic number of {e} is {other}.", "tag": "correctness"}


def tagged_preference_pairs(r: random.Random, n: int) -> list:
    """n pairs, a third of each tag (the reward stage re-mixes them by its configured shares)."""
    makers = [safety_pair, contradiction_pair, correctness_pair]
    return [makers[i % 3](r) for i in range(n)]


def half_right_answers(r: random.Random, n: int) -> list:
    """Instructions from the tagged pairs' prompts answered with the chosen or the rejected answer at random: SFT
    on them gives a model that is right half the time (complying with harmful requests, contradicting itself,
    naming wrong atomic numbers), where RLHF has something to fix."""
    out = []
    for pair in tagged_preference_pairs(r, n):
        answer = pair["chosen"] if r.random() < 0.5 else pair["rejected"]
        out.append({"instruction": pair["prompt"], "input": "", "output": answer, "task": pair["tag"]})
    return out


def dialogue(r: random.Random) -> dict:
    conv = []
    for _ in range(r.randint(2, 4)):
        q, a = task_example(r, r.choice(["qa", "reasoning", "translation"]))
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"conversations": conv, "task": "dialogue"}


TASKS = ["qa", "code", "translation", "reasoning"]


def noisy_transfer_set(records: list, r: random.Random, noise: float = 0.3) -> list:
    """A distillation transfer set whose hard labels are 30% wrong: those answers belong to another record of
    the same task (the mismatched pairs real instruction data has). A teacher trained on clean data supplies
    the soft targets; the CE-only baseline has only these labels."""
    by_task = {}
    for rec in records:
        by_task.setdefault(rec["task"], []).append(rec["output"])
    out = []
    for rec in records:
        rec = dict(rec)
        if r.random() < noise:
            rec["output"] = r.choice([o for o in by_task[rec["task"]] if o != rec["output"]] or [rec["output"]])
            rec["label_noise"] = True
        out.append(rec)
    return out


def synthesize(out_dir: str, seed: int = 0, n_text: int = 2000, n_sft: int = 2000, n_eval: int = 200,
               vocab_size: int = 512, version: str = "SYNTH_v1") -> dict:
    """Write every dataset (see module docstring); returns the manifest. Same seed -> same bytes."""
    os.makedirs(out_dir, exist_ok=True)
    r = random.Random(seed)
    files = {}

    def write(name, records):
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        files[name] = path

    makers = {"general": general_text, "science": science_text, "code": code_text}
    for domain, make in makers.items():
        write(f"pretrain_{domain}.jsonl", [{"text": make(r), "domain": domain} for _ in range(n_text)])
        write(f"eval_{domain}.jsonl", [{"text": make(r), "domain": domain} for _ in range(n_eval)])
    alpaca = []
    for _ in range(n_sft):
        task = r.choice(TASKS)
        instr, ans = task_example(r, task)
        alpaca.append({"instruction": instr, "input": "", "output": ans, "task": task})
    write("sft_alpaca.jsonl", alpaca)
    write("sft_code_reasoning.jsonl", [a for a in alpaca if a["task"] in ("code", "reasoning")])
    held_out = []
    for _ in range(n_eval):
        task = r.choice(TASKS)
        instr, ans = task_example(r, task)
        held_out.append({"prompt": instr, "answer": ans, "task": task})
    write("sft_eval.jsonl", held_out)
    write("sft_sharegpt.jsonl", [{"conversations": [{"from": "human", "value": a["instruction"]},
                                                    {"from": "gpt", "value": a["output"]}], "task": a["task"]}
                                 for a in alpaca[: n_sft // 2]])
    write("dialogues.jsonl", [dialogue(r) for _ in range(n_sft // 2)])
    write("dialogues_eval.jsonl", [dialogue(r) for _ in range(n_eval)])
    write("preference.jsonl", [preference_pair(r) for _ in range(n_sft // 2)])
    write("prompts_train.jsonl", [verifiable_prompt(r) for _ in range(n_sft)])
    write("prompts_eval.jsonl", [verifiable_prompt(r) for _ in range(n_eval)])
    corpus = os.path.join(out_dir, "tokenizer_corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        for name, path in files.items():
            with open(path, encoding="utf-8") as src:
                for line in src:
                    f.write(" ".join(str(v) for v in _strings(json.loads(line))) + "\n")
    train_sentencepiece(corpus, os.path.join(out_dir, "tokenizer"), vocab_size)
    os.remove(corpus)
    # written after the tokenizer is trained (same distributions; keeps the tokenizer what it was before them)
    write("distill_transfer.jsonl", noisy_transfer_set(alpaca[:n_sft // 2], random.Random(seed + 5)))
    rp = random.Random(seed + 6)
    write("distill_prompts.jsonl", [dict(zip(("prompt", "answer"), task_example(rp, t)), task=t)
                                    for t in (rp.choice(TASKS) for _ in range(n_sft // 4))])
    write("eval_science_mc.jsonl", science_choices(random.Random(seed + 7), n_eval // 2))
    # the tagged reward/DPO pairs replace the untagged ones the tokenizer was trained with (same tokenizer as before)
    write("preference.jsonl", tagged_preference_pairs(random.Random(seed + 8), n_sft // 2))
    write("preference_eval.jsonl", tagged_preference_pairs(random.Random(seed + 9), n_eval))
    write("sft_rlhf.jsonl", half_right_answers(random.Random(seed + 10), n_sft // 2))
    ra = random.Random(seed + 11)
    # three times the instructions' count: fewer, the tiny model learns the training questions' numbers
    # by heart instead of copying them from the question into the call
    write("agent_sft.jsonl", [agent_task(ra) for _ in range(3 * n_sft)])
    write("agent_eval.jsonl", [agent_task(ra) for _ in range(n_eval)])
    write("agent_prompts.jsonl", [{"prompt": t["messages"][0]["content"], "answer": t["answer"], "task": t["task"],
                                   "tools": t["tools"]} for t in (agent_task(ra) for _ in range(n_sft))])
    write("agent_prompts_eval.jsonl", [{"prompt": t["messages"][0]["content"], "answer": t["answer"],
                                        "task": t["task"], "tools": t["tools"]}
                                       for t in (agent_task(ra) for _ in range(n_eval))])
    with open(os.path.join(out_dir, "agent_tools.py"), "w", encoding="utf-8") as f:
        f.write(AGENT_TOOL_SOURCE)
    # the pretraining text again as a domain-tagged shard index (configs/tiny/cpt.yaml samples it by domain)
    build_index([(files[f"pretrain_{d}.jsonl"], d) for d in makers], Tokenizer.load(os.path.join(out_dir, "tokenizer")),
                os.path.join(out_dir, "index"), shard_tokens=SHARD_TOKENS, overwrite=True, progress=False)
    return write_manifest(out_dir, version, extra={"seed": seed})


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
