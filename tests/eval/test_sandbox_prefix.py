# SPDX-License-Identifier: Apache-2.0
"""The sandbox wherever Python is installed: the escape battery and HumanEval's canonical solutions, run by an
evaluator whose interpreter is a virtual environment under /tmp (`python -m venv /tmp/venv`, a common CI
layout), and one reached through a symlinked directory. Each run is a fresh pytest in that interpreter."""
import os
import pathlib
import shutil
import site
import subprocess
import tempfile
import venv

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def scratch():
    """A folder straight under /tmp whose path does not name pytest (the battery checks that the sandbox never
    shows the word, and the bound prefix's path is visible inside)."""
    path = tempfile.mkdtemp(prefix="ms_llm_prefix_", dir="/tmp")
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def _venv_python(scratch, symlinked: bool) -> str:
    """A venv under /tmp with its own copy of the interpreter (`venv`'s default), so the interpreter the sandbox
    runs really lives there, optionally made and run through a symlink to its folder. It sees this
    installation's packages through PYTHONPATH (set by the caller), not through its own site."""
    real = scratch / "real"
    real.mkdir()
    home = real
    if symlinked:
        home = scratch / "link"
        home.symlink_to(real)
    venv.EnvBuilder(with_pip=False, symlinks=False).create(str(home / "venv"))
    return str(home / "venv" / "bin" / "python")


@pytest.mark.slow
@pytest.mark.parametrize("symlinked", [False, True])
def test_escape_battery_and_humaneval_with_python_in_a_venv_under_tmp(tmp_path, scratch, symlinked):
    python = _venv_python(scratch, symlinked)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, *site.getsitepackages()]))
    probe = subprocess.run([python, "-c", "import os, sys, ms_llm.eval.sandbox as s; "
                            "print(os.path.realpath(sys.executable)); print(s.isolation_problem())"],
                           env=env, capture_output=True, text=True, cwd=tmp_path)
    interpreter, problem = probe.stdout.split("\n")[:2]
    assert interpreter.startswith(str(scratch / "real" / "venv")), probe      # what the sandbox will run
    assert problem == "None", probe.stdout + probe.stderr
    r = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
                        os.path.join(REPO, "tests/eval/test_sandbox.py"),
                        os.path.join(REPO, "tests/eval/test_humaneval.py") + "::test_canonical_solutions_pass_all_164"],
                       env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " failed" not in r.stdout and " passed" in r.stdout, tail
