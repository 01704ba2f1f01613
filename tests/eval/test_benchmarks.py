# SPDX-License-Identifier: Apache-2.0
"""Multiple choice (file layouts, scoring a model whose answer is known), perplexity, extraction, win-rate."""
import csv
import json
import math
import random

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ms_llm.errors import MsLlmError
from ms_llm.eval.generative import extract_answer, extract_code, perplexity, score_judge, win_rate
from ms_llm.eval.multiple_choice import LETTERS, build_prompt, evaluate, load_benchmark


def _csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_mmlu_and_ceval_layouts(tmp_path):
    _csv(tmp_path / "mmlu" / "dev" / "physics_dev.csv", [["2+2?", "3", "4", "5", "6", "B"]])
    _csv(tmp_path / "mmlu" / "test" / "physics_test.csv", [["1+1?", "2", "3", "4", "5", "A"], ["3+3?", "5", "6", "7", "8", "B"]])
    test, dev = load_benchmark(str(tmp_path / "mmlu"), "mmlu")
    assert [t["answer"] for t in test] == [0, 1] and test[0]["subject"] == "physics" and len(dev["physics"]) == 1
    prompt = build_prompt(test[0], dev["physics"])
    assert prompt.startswith("The following are multiple choice questions (with answers) about physics.")
    assert "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n1+1?" in prompt and prompt.endswith("Answer:")
    hdr = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    _csv(tmp_path / "ceval" / "val" / "law_val.csv", [hdr, ["0", "Q?", "a", "b", "c", "d", "D", ""]])
    _csv(tmp_path / "ceval" / "dev" / "law_dev.csv", [hdr, ["0", "E?", "a", "b", "c", "d", "C", "why"]])
    test, dev = load_benchmark(str(tmp_path / "ceval"), "ceval")
    assert test[0]["answer"] == 3 and test[0]["subject"] == "law" and dev["law"][0]["answer"] == 2


def test_bad_files_name_file_and_line(tmp_path):
    _csv(tmp_path / "m" / "test" / "x_test.csv", [["q", "a", "b", "c", "d", "A"], ["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(MsLlmError, match=r"x_test.csv:2: answer 'E' is not one of A, B, C, D"):
        load_benchmark(str(tmp_path / "m"), "mmlu")
    _csv(tmp_path / "c" / "val" / "y_val.csv", [["id", "question", "A", "B", "C", "answer"], ["0", "q", "a", "b", "c", "A"]])
    with pytest.raises(MsLlmError, match=r"y_val.csv:1: missing column\(s\) \['d'\]"):
        load_benchmark(str(tmp_path / "c"), "ceval")
    (tmp_path / "g.jsonl").write_text('{"question": "q", "choices": ["x", "y"], "answer": "C"}\n')
    with pytest.raises(MsLlmError, match=r"g.jsonl:1: answer 'C' does not name one of the 2 choices"):
        load_benchmark(str(tmp_path / "g.jsonl"), "jsonl")


def _toy_questions(rnd, n):
    words = ["pump", "valve", "core", "rod", "steam", "fuel", "loop", "grid"]
    return [{"question": f"Which word is {rnd.choice(words)}?", "choices": rnd.sample(words, 4),
             "answer": rnd.randrange(4), "subject": "toy"} for _ in range(n)]


@pytest.mark.slow
def test_model_trained_to_answer_c_scores_exactly_the_share_of_c(tmp_path):
    """The answer is fixed by the weights: after training on prompts always answered ' C', the model picks C,
    so its accuracy must equal the share of test questions whose key is C."""
    from ms_llm.data.tokenizer import train_sentencepiece
    from ms_llm.losses.lm import LMLoss
    from ms_llm.models import CausalLM, preset
    from ms_llm.training.optim import AdamW
    from ms_llm.training.step import LossScaleState, TrainStep
    rnd = random.Random(0)
    train_items, test_items = _toy_questions(rnd, 64), _toy_questions(rnd, 40)
    (tmp_path / "c.txt").write_text("\n".join(build_prompt(q, []) + " C" for q in train_items))
    tok = train_sentencepiece(str(tmp_path / "c.txt"), str(tmp_path / "tok"), 400)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    model = CausalLM(preset("tiny", vocab_size=tok.vocab_size))
    loss_net = LMLoss(model)
    step = TrainStep(loss_net, AdamW(loss_net.trainable_params(), weight_decay=0.0), LossScaleState(False), 1, 1.0)
    seqs = [tok.encode(build_prompt(q, []), add_bos=True) + tok.encode(" C") for q in train_items]
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int32)
    labels = np.full((len(seqs), width), -100, np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        labels[i, len(s) - 2] = s[-1]              # only the answer letter carries loss
    for it in range(60):
        sel = np.arange(16) + (it * 16) % 64
        step([(Tensor(ids[sel]), Tensor(labels[sel]))], 3e-3)
    res = evaluate(model, tok, test_items, method="letter")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    assert set(res["predictions"]) == {LETTERS.index("C")}
    share_c = np.mean([q["answer"] == 2 for q in test_items])
    assert res["accuracy"] == pytest.approx(share_c) and 0 < share_c < 1


def test_perplexity_equals_exp_mean_nll(tmp_path):
    from ms_llm.data.tokenizer import train_sentencepiece
    from ms_llm.models import CausalLM, preset
    docs = [{"text": "the pump and the valve", "domain": "a"}, {"text": "core rod fuel loop", "domain": "b"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "c.txt").write_text("\n".join(d["text"] for d in docs) * 50)
    tok = train_sentencepiece(str(tmp_path / "c.txt"), str(tmp_path / "tok"), 300)
    model = CausalLM(preset("tiny", vocab_size=tok.vocab_size))
    res = perplexity(model, tok, str(tmp_path / "d.jsonl"))
    nll, n = 0.0, 0
    for d in docs:
        ids = tok.encode(d["text"], add_bos=True, add_eos=True)
        logits = model(Tensor([ids], ms.int32)).asnumpy()[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        nll -= sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1))
        n += len(ids) - 1
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5) and set(res["domains"]) == {"a", "b"}


def test_answer_extraction():
    assert extract_answer("Natalia sold 48 clips.\n#### 72") == "72"
    assert extract_answer("23 + 58 = 81. The answer is 81.") == "81"
    assert extract_answer("so 1,234 in total", "number") == "1234"
    assert extract_answer("PMUP\nmore text", "text") == "PMUP"
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"


def test_win_rate_cancels_position_bias():
    prompts, a, b = ["p"] * 10, ["long answer"] * 10, ["short"] * 10
    always_first = lambda p, x, y: 1.0
    res = win_rate(prompts, a, b, always_first)
    assert res["win_rate"] == 0.5 and res["position_bias"] == 0.5
    longer = score_judge(lambda p, ans: len(ans))
    assert win_rate(prompts, a, b, longer)["win_rate"] == 1.0
    assert win_rate(prompts, b, a, longer)["win_rate"] == 0.0


def test_gate_and_results_files(tmp_path):
    from ms_llm.eval.results import gate, write_result
    assert gate(0.93, 0.9) == {"value": 0.93, "threshold": 0.9, "op": ">=", "passed": True}
    assert gate(0.006, 0.005, "<")["passed"] is False
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1?", "answer": "2"}\n')
    path = write_result(str(tmp_path / "res"), "em", {"accuracy": 0.5}, None, str(tmp_path / "d.jsonl"), {"k": 1})
    rec = json.loads(open(path).read())
    assert rec["metrics"]["accuracy"] == 0.5 and len(rec["dataset_sha256"]) == 64 and rec["settings"] == {"k": 1}


def test_exact_match_counts_what_generation_produced(tiny_model_dir):
    """Use the model's own greedy answers as references: every one must count as correct."""
    from ms_llm.data.readers import read_records
    from ms_llm.data.tokenizer import Tokenizer
    from ms_llm.eval.generative import exact_match
    from ms_llm.models import load_pretrained
    model, tok = load_pretrained(tiny_model_dir / "model"), Tokenizer.load(tiny_model_dir / "model")
    records = read_records(str(tiny_model_dir / "data" / "prompts_eval.jsonl"), "prompts")[:6]
    first = exact_match(model, tok, records, "chatml", max_new_tokens=6, style="text")
    assert first["n"] == 6 and first["accuracy"] < 1.0
    echoed = [dict(r, answer=o["extracted"]) for r, o in zip(records, first["outputs"])]
    assert exact_match(model, tok, echoed, "chatml", max_new_tokens=6, style="text")["accuracy"] == 1.0


def test_eval_humaneval_generates_with_a_model(tiny_model_dir, tmp_path, capsys):
    from ms_llm.cli import main
    from ms_llm.eval.humaneval import read_problems
    assert main(["eval", "humaneval", "--model", str(tiny_model_dir / "model"), "--limit", "2", "--k", "1",
                 "--max-new-tokens", "8", "--mode", "pynative"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tasks"] == 2 and out["pass@1"] == 0.0          # a random tiny model solves nothing ...
    # ... and the same scoring passes the reference solutions of those tasks, so 0.0 is not a broken sandbox
    problems = list(read_problems().values())[:2]
    samples = tmp_path / "canonical.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n"
                               for p in problems))
    assert main(["eval", "humaneval", "--samples", str(samples), "--k", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tasks"] == 2 and out["pass@1"] == 1.0


def test_functional_check_runs_code_answers_in_the_sandbox():
    from ms_llm.eval.generative import code_pass_at_1, functional_check
    ref = "def add_7(x):\n    return x + 7"
    assert functional_check("def add_7(x):\n    return 7 + x", ref)                  # different text, same function
    assert not functional_check("def add_7(x):\n    return x + 8", ref)
    assert not functional_check("def add_7(x):\n    import os\n    os.system('true')\n    return x + 7", ref)
    assert not functional_check("while True: pass", ref, timeout=1)
    outs = [{"output": "```python\ndef add_7(x):\n    return x+7\n```", "answer": ref},
            {"output": "def add_7(x): return 0", "answer": ref}, {"output": "42", "answer": "42"}]
    assert code_pass_at_1(outs) == 0.5


def test_bertscore_and_dialogue_coherence(tiny_model_dir):
    from ms_llm.data.readers import read_records
    from ms_llm.data.tokenizer import Tokenizer
    from ms_llm.eval.generative import bertscore, dialogue_coherence
    from ms_llm.models import load_pretrained
    model, tok = load_pretrained(tiny_model_dir / "model"), Tokenizer.load(tiny_model_dir / "model")
    same = bertscore(model, tok, ["the pump and the valve"], ["the pump and the valve"])
    other = bertscore(model, tok, ["the pump and the valve"], ["What is 12 + 30?"])
    assert same[0] == pytest.approx(1.0) and other[0] < same[0]
    dialogues = [r["messages"] for r in read_records(str(tiny_model_dir / "data" / "dialogues_eval.jsonl"), "sharegpt")[:2]]
    res = dialogue_coherence(model, tok, dialogues, "chatml", max_new_tokens=6)
    assert len(res["dialogues"]) == 2 and all(-1.0 <= v <= 1.0 for v in res["dialogues"])
