# SPDX-License-Identifier: Apache-2.0
"""Is this an Ascend machine ms_llm can run on? The CANN toolkit and the NPUs, checked before MindSpore starts
(by `ms-llm launch` and by every process that sets its context to Ascend). No MindSpore import here."""
import os
import shutil
import subprocess

from ms_llm.errors import MsLlmError

CANN_PREFIXES = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/ascend-toolkit", "/usr/local/Ascend")


def find_cann():
    """Path of the CANN toolkit's set_env.sh: $ASCEND_HOME_PATH first, then the default install prefixes."""
    roots = [os.environ["ASCEND_HOME_PATH"]] if os.environ.get("ASCEND_HOME_PATH") else []
    for root in roots + list(CANN_PREFIXES):
        for cand in (os.path.join(root, "set_env.sh"), os.path.join(root, "bin", "setenv.bash")):
            if os.path.isfile(cand):
                return cand
    return None


def check_ascend():
    """Fail fast, with what to do, when Ascend is asked for and CANN or the NPUs are missing."""
    cann = find_cann()
    if cann is None:
        raise MsLlmError("device_target is ascend but the CANN toolkit was not found (no set_env.sh under "
                         "$ASCEND_HOME_PATH or " + ", ".join(CANN_PREFIXES) + "). Install CANN and source its "
                         "set_env.sh, or set context.device_target: cpu. ms_llm never falls back to CPU on its own.")
    if shutil.which("npu-smi"):
        r = subprocess.run(["npu-smi", "info"], capture_output=True, text=True)
        if r.returncode != 0:
            raise MsLlmError(f"device_target is ascend but `npu-smi info` failed: {r.stderr.strip()[:300]}")
    return cann
