# SPDX-License-Identifier: Apache-2.0
"""Run untrusted, model-written Python in a separate, locked-down process.

Each program runs in a fresh temporary directory (deleted afterwards) under `python -I` with:
  * a wall-clock limit (the whole process group is SIGKILLed) and a CPU-time limit (RLIMIT_CPU);
  * address-space, file-size, open-file and core-dump limits (RLIMIT_AS / FSIZE / NOFILE / CORE);
  * a new session, so nothing it spawns outlives it; a fresh network namespace when the evaluator may
    create one (root on Linux), else no network through the guard below;
  * an environment with nothing of the caller's (only PATH, LANG and a temporary HOME);
  * a guard, run before the candidate, that removes process creation (fork, exec, spawn, system,
    subprocess, multiprocessing, ctypes), sockets and destructive file calls. Using one ends the program
    with status "refused".

Statuses: passed, failed (an exception or non-zero exit), timeout, memory (MemoryError or RLIMIT_AS),
refused (the guard stopped it), killed (a signal).
"""
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

REFUSED_EXIT, MEMORY_EXIT = 117, 118

GUARD = r'''
import builtins, os, sys
class SandboxViolation(BaseException):
    pass
def _deny(name):
    def f(*a, **k):
        raise SandboxViolation(name)
    return f
for _n in ("system", "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
           "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
           "posix_spawn", "posix_spawnp", "popen", "kill", "killpg", "setuid", "putenv", "unsetenv",
           "removedirs", "rmdir", "chmod", "chown", "truncate", "fchdir", "chroot", "unshare", "setns"):
    if hasattr(os, _n):
        setattr(os, _n, _deny("os." + _n))
import shutil as _sh
_sh.rmtree = _deny("shutil.rmtree"); _sh.move = _deny("shutil.move"); _sh.chown = _deny("shutil.chown")
import socket as _so
class _NoSocket:
    def __init__(self, *a, **k):
        raise SandboxViolation("socket")
_so.socket = _NoSocket; _so.create_connection = _deny("socket.create_connection")
_so.socketpair = _deny("socket.socketpair"); _so.fromfd = _deny("socket.fromfd")
_BLOCKED = {"subprocess", "multiprocessing", "ctypes", "_ctypes", "_posixsubprocess", "pty", "resource",
            "signal", "urllib.request", "http.client", "ftplib", "smtplib", "telnetlib", "asyncio", "ssl",
            "_socket", "select", "selectors", "concurrent"}
for _m in list(sys.modules):
    if _m.split(".")[0] in _BLOCKED or _m in _BLOCKED:
        del sys.modules[_m]
class _Blocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in _BLOCKED or name.split(".")[0] in _BLOCKED:
            raise SandboxViolation("import " + name)
        return None
sys.meta_path.insert(0, _Blocker)
_path = sys.argv[1]
sys.argv = sys.argv[1:]
_code = compile(open(_path).read(), _path, "exec")
try:
    exec(_code, {"__name__": "__main__", "__builtins__": builtins})
except SandboxViolation as e:
    sys.stderr.write("sandbox: refused " + str(e) + "\n")
    os._exit(REFUSED_EXIT)
except MemoryError:
    sys.stderr.write("sandbox: out of memory\n")
    os._exit(MEMORY_EXIT)
'''.replace("REFUSED_EXIT", str(REFUSED_EXIT)).replace("MEMORY_EXIT", str(MEMORY_EXIT))


@dataclass
class RunResult:
    status: str
    detail: str = ""
    returncode: int = 0


def _limits(cpu_s: int, memory_mb: int, file_mb: int, isolate_net: bool):
    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))     # not enforced for root; the guard covers it
        if isolate_net:
            try:
                os.unshare(os.CLONE_NEWNET)                      # an empty network namespace: no interfaces
            except (AttributeError, OSError):
                pass
    return apply


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 1024, file_mb: int = 16) -> RunResult:
    """Execute `program` (Python source) in the sandbox and classify the outcome."""
    work = tempfile.mkdtemp(prefix="ms_llm_sandbox_")
    try:
        path = os.path.join(work, "candidate.py")
        with open(path, "w") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen([sys.executable, "-I", "-c", GUARD, path], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True,
                                preexec_fn=_limits(int(timeout) + 1, memory_mb, file_mb, os.geteuid() == 0))
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return RunResult("timeout", f"exceeded {timeout:g} s", -9)
        finally:
            _kill_group(proc)                                    # anything it left behind in its session
        err = err.decode(errors="replace")[-2000:]
        rc = proc.returncode
        if rc == 0:
            return RunResult("passed", "", 0)
        if rc == REFUSED_EXIT:
            return RunResult("refused", err.strip().splitlines()[-1] if err.strip() else "", rc)
        if rc == MEMORY_EXIT or "MemoryError" in err:
            return RunResult("memory", "out of memory", rc)
        if rc < 0:
            if -rc == signal.SIGXCPU:
                return RunResult("timeout", "CPU time limit", rc)
            why = "file size limit" if -rc == signal.SIGXFSZ else f"signal {-rc}"
            return RunResult("killed", why, rc)
        return RunResult("failed", err.strip().splitlines()[-1] if err.strip() else f"exit {rc}", rc)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
