# SPDX-License-Identifier: Apache-2.0
"""PPO's wiring checked against an independent reference, not against itself: from one real step's batch as
the stage fed it to its updaters (log.rollouts_every), NumPy recomputes from the logged per-token log-probs of
policy and reference and the values the KL, the token rewards, the GAE advantages and the returns. With a
policy that has drifted from its reference the KL is positive, rewards fall as β rises and the adaptive
controller raises β. (GRPO's: test_grpo.py.)"""
import numpy as np
import pytest

from ms_llm.rollout.batch import read_rollout


# ---------------------------------------------------------------------------------------------- NumPy references
def _kl(old, ref, kind):
    d = old - ref
    return {"k1": d, "k2": d * d / 2, "k3": np.exp(-d) - 1 + d}[kind]


def _gae(rewards, values, mask, gamma, lam):
    """Loop over each row's own tokens, back to front; zero past its end."""
    adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        n, running = int(mask[i].sum()), 0.0
        for t in reversed(range(n)):
            nxt = values[i, t + 1] if t + 1 < n else 0.0
            running = rewards[i, t] + gamma * nxt - values[i, t] + gamma * lam * running
            adv[i, t] = running
            ret[i, t] = running + values[i, t]
    return adv, ret


def _whiten(x, mask):
    v = x[mask > 0]
    return np.where(mask > 0, (x - v.mean()) / (v.std() + 1e-8), 0.0)


def _ppo_stage(tmp_path, *over, drift=0.3):
    """A PPO stage on the digit task whose policy has drifted from its reference by `drift`·N(0, 1) on every
    weight; a sequence-level score (share of answer digits) and no dense reward."""
    import mindspore as ms
    from ms_llm.bench.ppo import DIGITS, NEW, DigitPrompts, digit_task_config
    from ms_llm.models import CausalLM, preset
    from ms_llm.models.frozen import freeze
    from ms_llm.models.value import ValueModel
    from ms_llm.stages.ppo import PPOStage
    cfg = digit_task_config(2, ["log.rollouts_every=1", "ppo.rollout_batch_size=32", "ppo.mini_batch_size=32",
                                "ppo.whiten_advantages=true", *over])
    shape = dict(vocab_size=DIGITS + 1, max_position_embeddings=32)
    ms.set_seed(0)
    policy = CausalLM(preset("tiny", **shape))
    reference = freeze(CausalLM(preset("tiny", **shape)))
    r = np.random.default_rng(3)
    ms.load_param_into_net(reference, {p.name: ms.Parameter(p.asnumpy(), name=p.name)
                                       for p in policy.get_parameters()}, strict_load=True)
    for p in policy.get_parameters():
        p.set_data(ms.Tensor((p.asnumpy() + drift * r.standard_normal(p.shape)).astype(np.float32)))
    value = ValueModel(CausalLM(preset("tiny", **shape)), 32)

    def score(prompts, tokens, lengths):
        right = [np.mean(tokens[i, :min(int(lengths[i]), NEW)] == np.array(x["answer"][:NEW]))
                 for i, x in enumerate(prompts)]
        return {"total": np.array(right, np.float64) * 2 - 0.5, "parts": {}, "dense": None, "texts": [""] * len(prompts)}
    stage = PPOStage(cfg, policy, reference, value, score, DigitPrompts(0), run_dir=str(tmp_path))
    for u in stage.updaters():
        u.loss_net.set_train(True)
    return stage


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_ppo_rewards_advantages_and_returns_equal_a_numpy_recomputation(tmp_path, graph_mode, estimator):
    stage = _ppo_stage(tmp_path, f"ppo.kl.estimator={estimator}", "ppo.kl.init_coef=0.2")
    row, _ = stage.step(0, 0)
    a, meta = read_rollout(str(tmp_path / "rollouts" / "step_000001.safetensors"))
    mask = a["response_mask"].astype(np.float64)
    old, ref, values = a["old_logps"], a["ref_logps"], a["values"]
    assert meta["kl_coef"] == row["kl_coef"] == pytest.approx(0.2) and meta["kl_estimator"] == estimator
    # the logged π_old is the policy's: the sampler (another code path) drew the tokens with the same log-probs
    n = a["behaviour_logps"].shape[1]
    np.testing.assert_allclose(old[:, :n] * mask[:, :n], a["behaviour_logps"] * mask[:, :n], atol=2e-4)
    kl = _kl(old, ref, estimator) * mask
    np.testing.assert_allclose(a["kl"], kl, atol=1e-6)
    assert kl.sum(-1).mean() > 0.05                        # drifted from the reference: a clearly positive KL
    assert row["kl"] == pytest.approx(kl.sum(-1).mean(), abs=1e-6)
    rewards = -meta["kl_coef"] * kl
    last = mask.sum(-1).astype(int) - 1
    rewards[np.arange(len(last)), last] += a["score"]
    np.testing.assert_allclose(a["rewards"], rewards, atol=1e-6)
    adv, ret = _gae(rewards, values * mask, mask, meta["gamma"], meta["lam"])
    np.testing.assert_allclose(a["returns"], ret, atol=1e-6)
    np.testing.assert_allclose(a["advantages"], _whiten(adv, mask), atol=1e-6)


def test_with_a_drifted_policy_rewards_fall_as_beta_rises_and_the_adaptive_controller_raises_beta(tmp_path,
                                                                                                   graph_mode):
    stage = _ppo_stage(tmp_path, "ppo.kl.controller=adaptive", "ppo.kl.init_coef=0.05", "ppo.kl.target=0.01",
                       "ppo.kl.horizon=200")
    prompts = stage.prompts.take(32)
    rows = stage.score_rows(stage.roll_out(0, prompts))
    totals = []
    for beta in (0.0, 0.05, 0.5):
        stage.kl.beta = beta
        _, sc = stage.score(prompts, rows)
        assert sc["kl"] > 0.05
        totals.append(sc["rewards"].sum(-1).mean())
    assert totals[0] > totals[1] > totals[2]
    np.testing.assert_allclose(totals[0] - totals[2], 0.5 * sc["kl"], rtol=1e-6)   # exactly β·KL apart
    stage.kl.beta = 0.05
    row, _ = stage.step(0, 0)
    assert row["kl"] > 0.01 and row["kl_coef"] == 0.05 and stage.kl.beta > 0.05      # KL above target: β rises
