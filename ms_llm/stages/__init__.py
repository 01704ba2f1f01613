# SPDX-License-Identifier: Apache-2.0
"""One module per stage, each with `run(cfg, layout) -> summary`; the stage registry (config/registry.py) names it.

`run_stage(cfg)` is what `ms-llm train` and every msrun worker (launch.worker_main) call: it sets up
MindSpore, finds this process's Layout (one process, or its place under msrun) and runs the stage.
"""
import importlib
import json
import logging

from ms_llm.config.registry import STAGES as REGISTRY
from ms_llm.training.layout import Layout, rollout_ranks


def stage_runner(name: str):
    """The `run` function of stage `name`: stages/<module>.py as its registry entry names it."""
    return importlib.import_module(f"ms_llm.stages.{REGISTRY[name].module}").run


def run_stage(cfg) -> dict:
    """Set up MindSpore for `cfg`, build this process's Layout and run its stage; rank 0 prints a JSON line."""
    # MindSpore-backed: the CLI imports this package, and only a run needs MindSpore
    from ms_llm.context import setup_for
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setup_for(cfg)
    par = cfg.parallel
    layout = Layout()
    if par.data_parallel * par.tensor_parallel * par.pipeline_stages + rollout_ranks(cfg) > 1:
        # MindSpore-backed: the CLI imports this package, and only a run needs MindSpore
        from ms_llm.distributed import init_layout
        layout = init_layout(cfg)
    summary = stage_runner(cfg.stage)(cfg, layout)
    if layout.main and summary:
        print(json.dumps({"stage": summary["stage"], "status": summary["status"], "steps": summary["steps"],
                          "loss": summary["metrics"].get("loss"), "final": (summary.get("final") or {}).get("path")}))
    return summary
