# SPDX-License-Identifier: Apache-2.0
"""The DPO stage: ln 2 at the start, exact accumulation, held-out accuracy rises, the reference cache is bound
to its data and reference, resume is exact, SimPO / KTO / LoRA with the adapter-disabled reference train."""
import json
import math
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import assert_resumed_run_equals, kill_once_written, run_cli

QUICK = ("train.progress_bar=false", "log.plots=false")
# plain full-weight DPO from the pretrained model (the config's LoRA + NLL variant is set back where a test wants it)
BASE = ("model.init_from=runs/tiny_pretrain", "dpo.winrate.judge=null", "dpo.gate_accuracy=null",
        "dpo.eval_limit=64", "lr_schedule.warmup_steps=0", "dpo.lora.enabled=false", "dpo.nll_coef=0",
        "optim.lr=5e-4")


def _dpo(workdir, *over):
    return run_cli(workdir, "train", "configs/tiny/dpo.yaml", *QUICK, *BASE, *over)


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def _rows(run):
    """The training steps' rows (a step-0 evaluation row, logged before any update, is not one)."""
    return [r for r in [json.loads(line) for line in open(run / "metrics.jsonl")] if r["step"] > 0]


def _random_pairs(rng, n, s=12, v=256):
    ids = rng.integers(3, v, (2, n, s)).astype(np.int32)
    labels = np.where(np.arange(s)[None, None, :] >= rng.integers(2, 6, (2, n, 1)), np.roll(ids, -1, -1), -100)
    labels[..., -1] = -100
    ref = rng.normal(-30, 3, (2, n)).astype(np.float32)
    return ids, labels.astype(np.int32), ref


@pytest.mark.slow
def test_batch_of_8_equals_8_accumulated_micro_batches(tmp_path, graph_mode):
    """The loss, every reported sum and the updated weights of one step: batch 8 vs 8 x 1 (<= 1e-5)."""
    from ms_llm.config import load_config
    from ms_llm.losses.dpo import PreferenceLoss
    from ms_llm.models import CausalLM, preset
    from ms_llm.models.io import load_state_dict, model_state_dict
    from ms_llm.training.updater import Updater
    (tmp_path / "c.yaml").write_text("model: {preset: tiny}\ndata: {sources: [{path: x.jsonl}]}\n")
    ids, labels, ref = _random_pairs(np.random.default_rng(0), 8)
    ms.set_seed(0)
    start = model_state_dict(CausalLM(preset("tiny", vocab_size=256)))
    results = []
    for accum in (1, 8):
        cfg = load_config(str(tmp_path / "c.yaml"), [f"train.grad_accum_steps={accum}", "optim.lr=1e-3",
                                                     "train.loss_scale=none"])
        model = CausalLM(preset("tiny", vocab_size=256))
        load_state_dict(model, start)
        upd = Updater("policy", cfg, PreferenceLoss(model, "sigmoid", 0.1), model)
        parts = np.split(np.arange(8), accum)
        batches = [tuple(Tensor(x) for x in (ids[0][p], labels[0][p], ids[1][p], labels[1][p], ref[0][p], ref[1][p]))
                   for p in parts]
        results.append((upd(batches, 0), model_state_dict(model)))
    (a, wa), (b, wb) = results
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
    assert max(np.abs(wa[k] - wb[k]).max() for k in wa) <= 1e-5
    assert max(np.abs(wa[k] - start[k]).max() for k in wa) > 1e-4          # the step moved the weights


@pytest.mark.slow
def test_dpo_starts_at_ln2_and_lifts_held_out_accuracy(tiny_pretrained, tiny_reward):
    _dpo(tiny_pretrained, "train.output_dir=runs/dpo_a", "train.max_steps=40", "checkpoint.every=0",
         "dpo.winrate.judge=runs/tiny_reward", "dpo.winrate.limit=8", "dpo.gate_accuracy=0.6")
    run = tiny_pretrained / "runs" / "dpo_a"
    s = _summary(run)
    m = s["metrics"]
    assert m["first_loss"] == pytest.approx(math.log(2), abs=1e-6)        # policy == reference at step 1
    assert m["before/eval/preference_accuracy"] == 0.5                     # every held-out pair a tie
    first = json.loads(open(run / "metrics.jsonl").readline())
    assert first["step"] == 0 and first["eval/preference_accuracy"] == 0.5   # logged at step 0, before any update
    assert m["eval/preference_accuracy"] >= 0.75 and m["eval/reward_margin"] > 0
    assert m["loss"] < 0.6 and m["rewards/margin"] > 0
    assert s["gates"]["preference_accuracy"]["passed"]
    assert m["winrate/n"] == 8 and 0.0 <= m["winrate/win_rate"] <= 1.0
    assert m["winrate/position_bias"] == 0.0       # a scalar judge: both orders agree by construction
    manifest = json.loads((run / "reference_logps" / "MANIFEST.json").read_text())
    assert manifest["reference"].startswith(_summary(tiny_pretrained / "runs" / "tiny_pretrain")["final"]["sha256"])


@pytest.mark.slow
def test_dpo_resume_equals_uninterrupted_and_reuses_the_cache(tiny_pretrained):
    over = ("train.max_steps=9", "checkpoint.every=4", "train.eval_every=0", "train.log_every=1")
    _dpo(tiny_pretrained, "train.output_dir=runs/dpo_full", *over)
    args = ["train", "configs/tiny/dpo.yaml", *QUICK, *BASE, "train.output_dir=runs/dpo_kill", *over]
    run = tiny_pretrained / "runs" / "dpo_kill"
    kill_once_written(tiny_pretrained, args, run / "checkpoints" / "step_000004" / "MANIFEST.json")
    cache = run / "reference_logps" / "MANIFEST.json"
    before = cache.stat().st_mtime_ns
    r = run_cli(tiny_pretrained, *args)
    assert "reference log-probs from the cache" in r.stderr and cache.stat().st_mtime_ns == before
    assert_resumed_run_equals(tiny_pretrained / "runs" / "dpo_full", run, 9, 4)
    # that cache, named for a run on other data or with another reference, is refused (exit 2) before training
    for over, why in (("data.seq_len=80", "built for other data"),
                      ("dpo.reference.path=runs/tiny_pretrain/checkpoints/step_000100", "built for other reference model")):
        r = subprocess.run([sys.executable, "-m", "ms_llm.cli", "train", "configs/tiny/dpo.yaml", *QUICK, *BASE,
                            "train.output_dir=runs/dpo_other", "dpo.cache_dir=runs/dpo_kill/reference_logps", over],
                           cwd=tiny_pretrained, capture_output=True, text=True)
        assert r.returncode == 2 and why in r.stderr, r.stderr[-2000:]


def _held_out_pairs(work, n: int = 600) -> str:
    """n preference pairs of the synthetic tasks (three tags) that are not in the training file, written to the
    work dir; returns the path."""
    import random
    from ms_llm.data.synthetic import tagged_preference_pairs
    train = {x.strip() for x in open(work / "data" / "tiny" / "preference.jsonl")}
    path = work / "data" / "tiny" / "preference_heldout.jsonl"
    fresh = [json.dumps(p) for p in tagged_preference_pairs(random.Random(20261206), 3 * n)]
    fresh = [x for x in dict.fromkeys(fresh) if x not in train][:n]
    assert len(fresh) == n
    path.write_text("".join(x + "\n" for x in fresh))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("loss,extra", [("simpo", ("dpo.beta=2.0",)), ("kto", ())])
def test_simpo_and_kto_train(tiny_pretrained, loss, extra):
    """30 steps, evaluated on 600 held-out pairs of the synthetic tasks made here (none of them a training pair).
    Claimed beyond 3 standard errors: SimPO's held-out preference accuracy rises (measured 0.75 -> 0.89 on 64
    pairs and 0.74 -> 0.83 on the 200 of preference_eval.jsonl: 2.1 and 2.2 standard errors, hence 600); KTO's
    loss falls (first vs last 10 steps; measured 5 SE). KTO's accuracy is not claimed to rise (0.50 -> 0.62 on
    200 pairs, 2.4 SE): what is checked is that it does not fall by 3 standard errors. SimPO's per-step loss is
    noisier (its drop measured 1.2 SE), so only its mean is checked to fall."""
    out, held_out = f"runs/dpo_{loss}", _held_out_pairs(tiny_pretrained)
    _dpo(tiny_pretrained, f"train.output_dir={out}", "train.max_steps=30", "checkpoint.every=0", "train.log_every=1",
         "dpo.reference_mode=online", f"dpo.loss={loss}", f"dpo.eval_data={held_out}", "dpo.eval_limit=0", *extra)
    run = tiny_pretrained / out
    m, losses = _summary(run)["metrics"], np.array([r["loss"] for r in _rows(run)])
    first, last = losses[:10], losses[-10:]
    assert np.mean(losses[-10:]) < np.mean(losses[:5])
    if loss == "kto":
        assert first.mean() - last.mean() >= 3 * np.sqrt(first.var(ddof=1) / 10 + last.var(ddof=1) / 10)
    before, after = m["before/eval/preference_accuracy"], m["eval/preference_accuracy"]
    n = 600 - m["eval_skipped_pairs"]
    se = np.sqrt(before * (1 - before) / n + after * (1 - after) / n)       # two proportions, unpaired: conservative
    print(f"{loss}: preference accuracy {before:.3f} -> {after:.3f} on {n} pairs (SE {se:.3f})")
    if loss == "simpo":
        assert after - before >= 3 * se
    else:
        assert after - before >= -3 * se
    if loss == "simpo":
        assert not (run / "reference_logps").exists()                   # reference-free: none loaded or scored
    else:
        kl = [r["kto/kl"] for r in _rows(run)]
        assert min(kl) >= 0 and max(kl) > 0                            # z: clamped at 0, and moving


@pytest.mark.slow
def test_lora_policy_uses_its_base_as_the_reference(tiny_pretrained):
    _dpo(tiny_pretrained, "train.output_dir=runs/dpo_lora", "train.max_steps=20", "checkpoint.every=10",
         "dpo.reference_mode=online", "dpo.lora.enabled=true", "dpo.lora.dropout=0", "optim.lr=5e-3")
    run = tiny_pretrained / "runs" / "dpo_lora"
    m = _summary(run)["metrics"]
    assert m["first_loss"] == pytest.approx(math.log(2), abs=1e-6)        # adapter B = 0: base == reference
    assert m["loss"] < m["first_loss"] and m["eval/preference_accuracy"] > 0.6
    assert (run / "final_adapter" / "adapter_model.safetensors").exists()
    assert (run / "checkpoints" / "step_000010" / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_msrun_ranks_equal_one_process(tiny_pretrained):
    """Batch 8 in one process = 2 msrun ranks of 4, plain and with ZeRO-3 (half of every matrix, its gradient and
    Adam state per rank): per-step losses and final weights (batch 8 = 8 x 1 accumulation is checked in process
    above)."""
    from ms_llm.models.safetensors_io import read_safetensors
    over = ("train.max_steps=3", "checkpoint.every=0", "train.eval_every=0", "train.log_every=1", "dpo.eval_data=null")
    _dpo(tiny_pretrained, "train.output_dir=runs/dpo_b8", "train.micro_batch_size=8", *over)
    for name, port, shard in (("dpo_dp2", "8171", "none"), ("dpo_zero3", "8177", "zero3")):
        run_cli(tiny_pretrained, "launch", "configs/tiny/dpo.yaml", *QUICK, *BASE, *over, "train.micro_batch_size=4",
                f"parallel.optimizer_shard={shard}", f"train.output_dir=runs/{name}", "--nproc-per-node", "2",
                "--master-port", port, "--log-dir", f"logs_{name}", "--cluster-timeout", "60")
    runs = [tiny_pretrained / "runs" / n for n in ("dpo_b8", "dpo_dp2", "dpo_zero3")]
    losses = [[r["loss"] for r in _rows(run)] for run in runs]
    weights = [read_safetensors(str(run / "final" / "model.safetensors")) for run in runs]
    for other, w in zip(losses[1:], weights[1:]):
        np.testing.assert_allclose(other, losses[0], atol=1e-5)
        # The weights agree to 1e-5 but for Adam's amplification of gradients that cancel: an embedding row's
        # gradient summed over 8 rows, or over 4 + 4 and an AllReduce, differs in its last bits; where it is ~0,
        # m/sqrt(v) turns that into part of a full step. On an AVX-512 Xeon one element of 256k differs by 1.9e-5
        # (of 1.05e-3 moved); so: every element within 3e-5, and at most one in 10,000 beyond 1e-5.
        diffs = np.concatenate([np.abs(w[k] - weights[0][k]).ravel() for k in w])
        assert diffs.max() <= 3e-5 and (diffs > 1e-5).sum() <= diffs.size // 10_000, (diffs.max(), (diffs > 1e-5).sum())
    assert losses[0][0] == pytest.approx(math.log(2), abs=1e-6) and losses[0][-1] != losses[0][0]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kto_reference_point_is_the_global_batchs_two_ranks_and_accumulation_equal_one_process(tiny_pretrained):
    """KTO's z is the mean over the step's whole batch: batch 8 in one process = 2 accumulated micro-batches of
    4 = 2 msrun ranks of 4, in z (kto/kl), the per-step losses and the final weights. The reference is a model
    one step from its random start, so that π(y′) − ρ(y′) is positive and z is not clamped to 0 (against the
    policy's own base it stays at 0 for the first steps, and any estimate would pass)."""
    from ms_llm.models.safetensors_io import read_safetensors
    run_cli(tiny_pretrained, "train", "configs/tiny/pretrain.yaml", *QUICK, "train.max_steps=1", "checkpoint.every=0",
            "data.eval_fraction=0", "train.output_dir=runs/kto_reference")
    over = ("train.max_steps=3", "checkpoint.every=0", "train.eval_every=0", "train.log_every=1", "dpo.eval_data=null",
            "dpo.loss=kto", "dpo.reference_mode=online", "dpo.reference.path=runs/kto_reference/final")
    _dpo(tiny_pretrained, "train.output_dir=runs/kto_b8", "train.micro_batch_size=8", *over)
    _dpo(tiny_pretrained, "train.output_dir=runs/kto_acc", "train.micro_batch_size=4", "train.grad_accum_steps=2",
         *over)
    run_cli(tiny_pretrained, "launch", "configs/tiny/dpo.yaml", *QUICK, *BASE, *over, "train.micro_batch_size=4",
            "train.output_dir=runs/kto_dp2", "--nproc-per-node", "2", "--master-port", "8173", "--log-dir",
            "logs_kto", "--cluster-timeout", "60")
    runs = [tiny_pretrained / "runs" / n for n in ("kto_b8", "kto_acc", "kto_dp2")]
    rows = [_rows(run) for run in runs]
    z = [[r["kto/kl"] for r in x] for x in rows]
    assert max(z[0]) > 1.0 and len(set(z[0])) == 3            # off its clamp, and moving with the policy
    weights = [read_safetensors(str(run / "final" / "model.safetensors")) for run in runs]
    for i in (1, 2):
        np.testing.assert_allclose(z[i], z[0], atol=1e-5)
        np.testing.assert_allclose([r["loss"] for r in rows[i]], [r["loss"] for r in rows[0]], atol=1e-5)
        diffs = np.concatenate([np.abs(weights[i][k] - weights[0][k]).ravel() for k in weights[0]])
        assert diffs.max() <= 3e-5 and (diffs > 1e-5).sum() <= diffs.size // 10_000, (diffs.max(), (diffs > 1e-5).sum())
