# SPDX-License-Identifier: Apache-2.0
"""Run outputs: metrics.jsonl (one object per logged step), TensorBoard events, summary.json, plots."""
import json
import math
import os

import numpy as np

from ms_llm.fileio import write_json_atomic

SUMMARY_STATUSES = ("completed", "stopped_early", "failed")


class RunLogger:
    """Appends metric lines (rank 0 only); mirrors scalars to TensorBoard when enabled."""

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True):
        self.run_dir, self.enabled = run_dir, enabled
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if enabled and tensorboard:
            # tensorboardX takes about 2 s to import: only when TensorBoard logging is on
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            _drop_events_on_io_errors(self.tb)

    def truncate_after(self, step: int):
        """On resume: drop lines a crashed run logged after the checkpoint it resumes from."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)

    def log(self, step: int, values: dict):
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, float) else v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError:             # a full disk: the run's own error says so, once
                pass
            self.tb = None


def _drop_events_on_io_errors(tb):
    """tensorboardX writes events from a thread of its own, whose OSError on a full disk would print a second
    traceback after the run's one-line error. Its writes and flushes drop the events instead; the metrics file,
    written in the training thread, reports the failure."""
    writer = getattr(getattr(tb._get_file_writer(), "event_writer", None), "_ev_writer", None)
    for name in ("_write_serialized_event", "flush", "close"):
        method = getattr(writer, name, None)
        if method is not None:
            setattr(writer, name, _dropping(method))


def _dropping(method):
    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except OSError:
            return None
    return call


def read_metrics(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_summary(run_dir: str, stage: str, status: str, steps: int, metrics: dict, gates: dict = None,
                  final: dict = None) -> dict:
    """summary.json as DESIGN.md defines it (written atomically)."""
    assert status in SUMMARY_STATUSES
    summary = {"stage": stage, "status": status, "steps": steps, "metrics": metrics, "gates": gates or {},
               "final": final}
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    return summary


def plot_metrics(run_dir: str, keys=("loss", "lr", "grad_norm", "eval/loss")) -> list:
    """One PNG per metric under plots/; returns the written paths."""
    # matplotlib loads only when a figure is drawn
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(run_dir)
    os.makedirs(os.path.join(run_dir, "plots"), exist_ok=True)
    out = []
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*pts))
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        path = os.path.join(run_dir, "plots", key.replace("/", "_") + ".png")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        out.append(path)
    return out


def radar_plot(path: str, labels: list, series: dict, title: str = ""):
    """Polar 'radar' chart: one closed polygon per series ({name: [value per label]}), values in [0, 1]."""
    # matplotlib loads only when a figure is drawn
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    angles = np.linspace(0, 2 * np.pi, len(labels), endpoint=False).tolist()
    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(111, polar=True)
    for name, values in series.items():
        ax.plot(angles + angles[:1], list(values) + list(values[:1]), label=name)
        ax.fill(angles + angles[:1], list(values) + list(values[:1]), alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize=7)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
