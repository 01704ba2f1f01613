# SPDX-License-Identifier: Apache-2.0
"""What `train` drives: a stage is an object that holds its models, their updaters and every piece of state a
resumed run needs.

    class MyStage(Stage):
        def updaters(self): ...                       # the Updaters, built once
        def step(self, step, micro_index): ...        # one optimizer step -> (row, micro-batches consumed)

and, where the stage has them: `evaluate()` (with `evaluates = True`), `state_dict()` / `load_state_dict()`,
`models()` for further checkpointed models, `weights_io()` when the main model is saved another way (LoRA
adapters), `should_stop(evals)`. `SupervisedStage` is the one-loss, one-updater shape most stages share: they
give it a loss cell, the batch fields it reads and `batch(micro_index)`.
"""
import time

import mindspore as ms
import numpy as np

from ms_llm.config import ExperimentConfig
from ms_llm.errors import MsLlmError
from ms_llm.peft.lora import load_adapter, save_adapter
from ms_llm.training.layout import Layout
from ms_llm.training.updater import Updater


class Stage:
    """Base of every stage's run object. `model` is the main model, checkpointed at the top level."""
    evaluates = False              # has an evaluate() (run every train.eval_every steps and at the end)
    evaluate_at_start = False      # and once before any update, logged as step 0

    def __init__(self, cfg: ExperimentConfig, model, layout: Layout = None):
        self.cfg, self.model, self.layout = cfg, model, layout or Layout()
        self.must_match = {}       # {name: value} a checkpoint must have been trained with to be resumed here

    def updaters(self) -> list:
        """The stage's Updaters (the same objects on every call); their names key the optimizer state."""
        raise NotImplementedError

    def step(self, step: int, micro_index: int) -> tuple:
        """Optimizer step `step` (0-based) starting at micro-batch `micro_index`: (row with "loss" and "skipped",
        micro-batches consumed)."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """{"eval/<name>": value}; called with every updater's net in eval mode."""
        return {}

    def should_stop(self, evals: list) -> bool:
        """After an evaluation: stop early? It may annotate `evals[-1]` (gate results)."""
        return False

    def state_dict(self) -> dict:
        """JSON-able stage state saved in trainer_state.json (overrides add theirs to this)."""
        return dict(self.must_match)

    def load_state_dict(self, state: dict):
        """Check (raise MsLlmError) and restore the stage state of a checkpoint's trainer_state.json (overrides
        call this first)."""
        for name, want in self.must_match.items():
            got = state.get(name, want)            # checkpoints from before a check was added pass it
            if got != want:
                raise MsLlmError(f"the checkpoint was trained with {name} {got}, this config asks for {want}; "
                                 f"resume with the same {name}, or start a new run")

    def models(self) -> dict:
        """Further checkpointed models: {name: (write(folder), read(folder))}, each in `<name>/`."""
        return {}

    def weights_io(self):
        """(write(folder, weights=None), read(folder)) for the main model when a checkpoint holds less than its
        full weights (LoRA: the adapter only); None: the trainer's own full-weight I/O. `weights`: {name: array}
        gathered from ZeRO-3 shards, to write instead of the parameters' own values."""
        return None


class SupervisedStage(Stage):
    """One loss cell, one updater: each step accumulates train.grad_accum_steps micro-batches, then updates.

    Subclasses give `keys` (the batch fields the loss reads, in order) and `batch(micro_index) -> {field: array}`.
    """
    keys: tuple = ()

    def __init__(self, cfg: ExperimentConfig, model, layout: Layout, loss_net, tokens_per_micro: int,
                 params=None, lr_scales=None, loss_norm: float = None):
        super().__init__(cfg, model, layout)
        self.loss_net, self.tokens_per_micro = loss_net, tokens_per_micro
        self._params, self._lr_scales, self._loss_norm = params, lr_scales, loss_norm
        self._updater = None
        self.done = 0              # steps done: the step an evaluation follows

    def updaters(self) -> list:
        if self._updater is None:
            self._updater = Updater("model", self.cfg, self.loss_net, self.model, self.layout, self._params,
                                    lr_scales=self._lr_scales,
                                    loss_norm=float(self._loss_norm or self.tokens_per_micro))
        return [self._updater]

    def batch(self, micro_index: int) -> dict:
        raise NotImplementedError

    def step(self, step: int, micro_index: int) -> tuple:
        accum = self.cfg.train.grad_accum_steps
        # built one at a time as the step consumes them (a micro-batch may carry large inputs, e.g. NEFTune
        # noise); the pipeline schedule walks them twice, so it gets a list
        row = self.update((self.batch(micro_index + j) for j in range(accum)), step, accum)
        return row, accum

    def update(self, batches, step: int, count: int) -> dict:
        """One optimizer update over `count` micro-batches ({field: array} each, an iterable); the step's row."""
        updater = self.updaters()[0]
        real = []                     # the non-padding tokens of each micro-batch that says how many it holds
        batches = (self._tensors(b, real) for b in batches)
        batches = list(batches) if self.layout.pp is not None else batches
        tic = time.perf_counter()
        out = updater(batches, step)
        dt = time.perf_counter() - tic
        tokens = self.tokens_per_micro * count * self.cfg.parallel.data_parallel
        row = {"loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
               "tokens_per_s": tokens / max(dt, 1e-9), "loss_scale": out["loss_scale"], "skipped": not out["finite"]}
        if real:                      # this rank's share of real tokens, taken as every rank's
            row["real_tokens_per_s"] = row["tokens_per_s"] * sum(real) / (self.tokens_per_micro * len(real))
        row.update({k: out[k] for k in updater.stat_names})
        self.done = step + 1
        return row

    def _tensors(self, batch: dict, real: list = None) -> tuple:
        if real is not None and "tokens" in batch:
            real.append(int(batch["tokens"]))
        return tuple(ms.Tensor(np.ascontiguousarray(batch[k])) for k in self.keys)


def adapter_io(model, init_from: str):
    """weights_io of a LoRA-trained model: checkpoints hold the adapter only (PEFT format). The writer takes
    the gathered factors when ZeRO-3 holds them sharded (trainer._save)."""
    return ((lambda folder, weights=None: save_adapter(model, folder, init_from, weights)),
            (lambda folder: load_adapter(model, folder)))
