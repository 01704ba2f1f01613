# SPDX-License-Identifier: Apache-2.0
"""SFT data: placeholders, think stripping, turn dropping, per-turn weights, and the multi-turn loss value."""
import json

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ms_llm.config.schema import SFTSection
from ms_llm.data.chat import render
from ms_llm.data.examples import supervised_example
from ms_llm.data.sft import SFTData, drop_oldest_turns, preprocess, turn_weights
from ms_llm.data.synthetic import synthesize
from ms_llm.data.tokenizer import Tokenizer
from ms_llm.errors import MsLlmError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftdata")
    synthesize(str(d), n_text=50, n_sft=100, n_eval=10)
    return Tokenizer.load(d / "tokenizer")


def test_preprocess():
    msgs = [{"role": "system", "content": "I am {{NAME}} by {{AUTHOR}}."},
            {"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>hmm</think> a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    out = preprocess(msgs, {"NAME": "Bot", "AUTHOR": "Team"}, keep_think=False, max_turns=1)
    assert out == [{"role": "system", "content": "I am Bot by Team."}, {"role": "user", "content": "q2"},
                   {"role": "assistant", "content": "a2"}]
    kept = preprocess(msgs, {}, keep_think=True, max_turns=15)
    assert kept[2]["content"] == "<think>hmm</think> a1" and len(drop_oldest_turns(kept, 2)) == 5


def test_three_turn_loss_equals_hand_computed_value(tok):
    """loss = (d^2 l1/n1 + d l2/n2 + l3/n3) / (d^2 + d + 1), with l_t the summed token NLL of turn t."""
    from ms_llm.losses.sft import SFTLoss
    from ms_llm.models import CausalLM, preset
    msgs = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"},
            {"role": "user", "content": "Translate to Zorbish: pump"}, {"role": "assistant", "content": "qvnq and more words"},
            {"role": "user", "content": "atomic number of gold?"}, {"role": "assistant", "content": "79"}]
    d, task_w = 0.5, 1.5
    ex = supervised_example(render(msgs, tok, "chatml"), 96, tok.pad_id)
    ex["weights"], ex["row_weight"] = turn_weights(ex, task_w, d)
    ms.set_seed(0)
    model = CausalLM(preset("tiny", vocab_size=tok.vocab_size))
    num, den = SFTLoss(model)(*(Tensor(ex[k][None]) for k in ("input_ids", "labels", "attention_mask", "weights")),
                              Tensor(np.array([ex["row_weight"]])), Tensor(np.arange(96, dtype=np.int32)[None]),
                              Tensor(np.zeros((1, 96), np.int32)))
    logits = model(Tensor(ex["input_ids"][None]), Tensor(ex["attention_mask"][None])).asnumpy()[0].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    turn_loss = []
    for t in range(3):
        pos = np.nonzero(ex["turn"] == t)[0]
        turn_loss.append(-sum(logp[p, ex["labels"][p]] for p in pos) / len(pos))
    w = [task_w * d ** 2, task_w * d, task_w]
    expected = sum(wi * li for wi, li in zip(w, turn_loss)) / sum(w)
    assert float(num.asnumpy() / den.asnumpy()) == pytest.approx(expected, rel=1e-5)
    assert len(set(np.nonzero(ex["turn"] == 1)[0])) > len(set(np.nonzero(ex["turn"] == 0)[0]))   # uneven turns


def test_multiturn_loss_is_the_same_for_batch_8_and_4x2_accumulation(tmp_path, tok, graph_mode):
    from ms_llm.losses.sft import SFTLoss
    from ms_llm.models import CausalLM, preset
    from ms_llm.training.optim import AdamW
    from ms_llm.training.step import LossScaleState, TrainStep
    rows = []
    for i in range(8):
        turns = [{"role": "user", "content": f"q{j} {i}"} if k == 0 else {"role": "assistant", "content": "a " * (1 + (i * j) % 7)}
                 for j in range(1 + i % 3) for k in range(2)]
        ex = supervised_example(render(turns, tok, "chatml"), 64, tok.pad_id)
        ex["weights"], ex["row_weight"] = turn_weights(ex, 1.0 + 0.5 * (i % 2), 0.7)
        ex["position_ids"], ex["segment_ids"] = np.arange(64, dtype=np.int32), np.zeros(64, np.int32)
        rows.append(ex)
    keys = ("input_ids", "labels", "attention_mask", "weights", "row_weight", "position_ids", "segment_ids")
    batch = {k: np.stack([r[k] for r in rows]) for k in keys}

    def run(micro):
        ms.set_seed(0)
        model = CausalLM(preset("tiny", vocab_size=tok.vocab_size))
        loss_net = SFTLoss(model)
        step = TrainStep(loss_net, AdamW(loss_net.trainable_params()), LossScaleState(False), 8 // micro, 1.0, loss_norm=micro)
        out = step([tuple(Tensor(batch[k][i:i + micro]) for k in keys) for i in range(0, 8, micro)], 1e-3)
        return out, {n: p.asnumpy() for n, p in model.parameters_and_names()}
    (a, wa), (b, wb) = run(8), run(2)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert max(np.abs(wa[k] - wb[k]).max() for k in wa) <= 1e-5


def test_sft_data_errors_and_skips(tmp_path, tok):
    from ms_llm.config.schema import DataSource
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}], "task": "qa"},
            {"conversations": [{"from": "gpt", "value": "out of order"}, {"from": "human", "value": "q"}]},
            {"conversations": []},
            {"conversations": [{"from": "human", "value": "long " * 200}, {"from": "gpt", "value": "x"}]}]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    src = [DataSource(path=str(path), format="sharegpt")]
    with pytest.raises(MsLlmError, match=r"s.jsonl:2: conversations\[0\]: roles out of order"):
        SFTData(src, tok, "chatml", 64, SFTSection())
    data = SFTData(src, tok, "chatml", 64, SFTSection(), on_error="skip")
    assert data.stats.skipped == 3 and sum(len(g) for g in data.groups) == 1
    assert any("s.jsonl:4: the last turn alone is" in r for r in data.stats.reasons)


def test_dataset_manifest_binding(tmp_path):
    from ms_llm.manifest import verify_dataset
    m = synthesize(str(tmp_path / "d"), n_text=20, n_sft=20, n_eval=5, version="DATASET_v3.0_sft")
    bound = verify_dataset(str(tmp_path / "d" / "MANIFEST.json"), "DATASET_v3.0_sft")
    assert bound["version"] == "DATASET_v3.0_sft" and len(bound["sha256"]) == 64 and m["version"] == bound["version"]
    with pytest.raises(MsLlmError, match="expects 'DATASET_v9'"):
        verify_dataset(str(tmp_path / "d" / "MANIFEST.json"), "DATASET_v9")
    with open(tmp_path / "d" / "sft_alpaca.jsonl", "a") as f:
        f.write('{"instruction": "x", "output": "y"}\n')
    with pytest.raises(MsLlmError, match=r"sft_alpaca.jsonl: SHA256 .* does not match MANIFEST.json .*the dataset "
                                         r"changed since its release"):
        verify_dataset(str(tmp_path / "d" / "MANIFEST.json"))


def test_convergence_rule_and_checkpoint_report(tmp_path):
    from ms_llm.stages.sft import checkpoint_report, converged
    stop = converged("eval/m", 0.01, 3)
    rows = [{"step": s, "eval/m": v} for s, v in [(1, 0.2), (2, 0.5), (3, 0.600), (4, 0.603), (5, 0.605)]]
    assert not stop(rows[:4]) and not stop(rows)              # 0.5 -> 0.6 moved 20%
    assert stop(rows + [{"step": 6, "eval/m": 0.606}])      # three consecutive moves under 1%
    evals = [{"step": s, "eval/m": v, "eval/m/a": v, "eval/m/b": 1 - v, "eval/m/c": v / 2} for s, v in [(10, 0.3), (20, 0.7)]]
    (tmp_path / "plots").mkdir()
    res = checkpoint_report(str(tmp_path), evals, "eval/m")
    assert res == {"best_step": 20, "best/eval/m": 0.7}
    assert "Best by `eval/m`: step 20" in (tmp_path / "checkpoint_report.md").read_text()
    assert (tmp_path / "plots" / "checkpoint_radar.png").stat().st_size > 1000
