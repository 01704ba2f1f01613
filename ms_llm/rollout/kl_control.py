# SPDX-License-Identifier: Apache-2.0
"""The KL coefficient β of PPO's per-token penalty, and the KL alarm (seed 000 §1.2.5.4.2).

    fixed      β stays at its initial value
    adaptive   e = clip(KL / target − 1, −0.2, 0.2);  β ← β·(1 + e·n / horizon)      (Ziegler et al. 2019)
               n: the samples in the rollout batch just measured; KL: their mean summed per-sequence KL

The alarm: KL above `alarm` raises an alarm in that step's metrics and multiplies the policy's learning-rate
factor by `lr_decay` (never below `lr_floor`); the stage writes the decision to decisions.jsonl.

`run_mean` is the mean KL over every step measured so far, the statistic of the stage's KL gate. A single step's
estimate (k1 over 16 sampled responses in the tiny runs) moves by ±1 nat from one step to the next, so a gate on
the logged steps alone would judge a run by a handful of draws. The state (β, the lr factor, alarms so far, the
KL sum and step count) is saved with every checkpoint and restored on resume.
"""
import logging

import numpy as np

log = logging.getLogger(__name__)


class KLController:
    def __init__(self, kind: str = "adaptive", init: float = 0.05, target: float = 0.02, horizon: float = 10000,
                 alarm: float = None, lr_decay: float = 0.5, lr_floor: float = 0.05):
        if kind not in ("fixed", "adaptive"):
            raise ValueError(f"KL controller {kind!r}: choose fixed or adaptive")
        self.kind, self.beta, self.target, self.horizon = kind, float(init), float(target), float(horizon)
        self.alarm, self.lr_decay, self.lr_floor = alarm, float(lr_decay), float(lr_floor)
        self.lr_factor, self.alarms = 1.0, 0
        self.kl_sum, self.steps = 0.0, 0

    @property
    def run_mean(self) -> float:
        """The mean KL over every step measured so far (NaN before the first)."""
        return self.kl_sum / self.steps if self.steps else float("nan")

    def update(self, kl: float, n: int) -> dict:
        """Adapt β to the measured KL of `n` samples; returns what happened ({"alarm": bool, ...})."""
        self.kl_sum += float(kl)
        self.steps += 1
        if self.kind == "adaptive":
            error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
            self.beta *= 1.0 + error * n / self.horizon
        event = {"alarm": False}
        if self.alarm is not None and kl > self.alarm:
            old = self.lr_factor
            self.lr_factor = max(self.lr_factor * self.lr_decay, self.lr_floor)
            self.alarms += 1
            event = {"alarm": True, "kl": float(kl), "threshold": float(self.alarm), "lr_factor_before": old,
                     "lr_factor_after": self.lr_factor}
        return event

    def state(self) -> dict:
        return {"beta": self.beta, "lr_factor": self.lr_factor, "alarms": self.alarms, "kl_sum": self.kl_sum,
                "steps": self.steps}

    def load_state(self, state: dict):
        self.beta, self.lr_factor, self.alarms = float(state["beta"]), float(state["lr_factor"]), int(state["alarms"])
        if "kl_sum" not in state:       # a checkpoint written before the run mean was kept
            log.warning("the checkpoint's KL controller has no KL sum: the KL gate's mean covers the steps after "
                        "this resume only")
        self.kl_sum, self.steps = float(state.get("kl_sum", 0.0)), int(state.get("steps", 0))
