# SPDX-License-Identifier: Apache-2.0
"""Domain curriculum: proportions per phase, the switch point, smoothing, boosts and resumption."""
import math

import numpy as np

from ms_llm.data.curriculum import CurriculumSampler, Phase, Schedule

SEED_PHASES = [Phase("phase1", 500e9, {"general": 60, "science": 30, "code": 10}),
               Phase("phase2", math.inf, {"general": 40, "science": 30, "code": 30})]
TOKENS_PER_SAMPLE = int(50e6)          # 10k samples = 500B tokens: the seed's phase boundary at sample 10000


def sampler(schedule, seed=0):
    # two general shards, one science, one code; the shard weights split their domain's share
    return CurriculumSampler([300, 100, 200, 150], ["general", "general", "science", "code"], [2, 1, 1, 1],
                             schedule, TOKENS_PER_SAMPLE, seed)


def domain_shares(s, start, stop):
    names = np.array(s.domains)[[s.lookup(k)[0] for k in range(start, stop)]]
    return {d: float(np.mean(names == d)) for d in ("general", "science", "code")}


def test_each_phase_is_within_one_percent_and_switches_at_its_token_count():
    s = sampler(Schedule(SEED_PHASES))
    p1, p2 = domain_shares(s, 0, 10000), domain_shares(s, 10000, 20000)
    for got, want in ((p1, SEED_PHASES[0].weights), (p2, SEED_PHASES[1].weights)):
        for d, w in want.items():
            assert abs(got[d] - w / 100) < 0.01, (got, want)
    # the switch: the last sample before 500B tokens uses phase 1's weights, the first at 500B phase 2's
    assert s.schedule.phase_at(9999 * TOKENS_PER_SAMPLE) == "phase1" and s.schedule.phase_at(10000 * TOKENS_PER_SAMPLE) == "phase2"
    np.testing.assert_allclose(s.source_probs(9999), [0.4, 0.2, 0.3, 0.1])
    np.testing.assert_allclose(s.source_probs(10000), [40 / 150, 20 / 150, 0.3, 0.3])
    # within a domain, shards follow their weights (2:1)
    src = np.array([s.lookup(k)[0] for k in range(10000)])
    assert abs(np.mean(src == 0) / max(np.mean(src == 1), 1e-9) - 2.0) < 0.15


def test_smoothing_blends_linearly_around_the_switch():
    s = Schedule(SEED_PHASES, smoothing_tokens=100e9)
    assert s.domain_weights(449e9) == {k: v / 100 for k, v in SEED_PHASES[0].weights.items()}
    mid = s.domain_weights(500e9)
    assert abs(mid["general"] - 0.5) < 1e-9 and abs(mid["code"] - 0.2) < 1e-9
    assert abs(s.domain_weights(551e9)["code"] - 0.3) < 1e-9


def test_boosts_and_anneal_apply_from_their_sample_and_survive_a_restart():
    sched = Schedule(SEED_PHASES, anneal_weights={"general": 10, "science": 10, "code": 80})
    s = sampler(sched)
    before = [s.lookup(k) for k in range(3000)]
    sched.boosts.append((2000, "code", 1.3))
    s.reset(2000)
    after = [s.lookup(k) for k in range(3000)]
    assert after[:2000] == before[:2000]                       # the past is untouched
    w = sched.domain_weights(2500 * TOKENS_PER_SAMPLE, 2500)
    assert abs(w["code"] - 13 / 103) < 1e-9                    # 10 x 1.3, renormalized
    sched.anneal_from_tokens = 2500 * TOKENS_PER_SAMPLE
    s.reset(2500)
    assert sched.phase_at(2600 * TOKENS_PER_SAMPLE) == "anneal"
    tail = [s.lookup(k) for k in range(2500, 6000)]
    # a fresh sampler with the checkpointed state reproduces the order exactly (resume)
    fresh_sched = Schedule(SEED_PHASES, anneal_weights={"general": 10, "science": 10, "code": 80})
    fresh_sched.load_state(sched.state())
    fresh = sampler(fresh_sched)
    assert [fresh.lookup(k) for k in range(2500, 6000)] == tail
    assert [fresh.lookup(k) for k in range(2000)] == before[:2000]
    codes = np.array(fresh.domains)[[x[0] for x in tail]]
    assert abs(np.mean(codes == "code") - 104 / 124) < 0.02    # anneal mixture, code still x1.3: 104 / (10 + 10 + 104)
