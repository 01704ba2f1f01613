# SPDX-License-Identifier: Apache-2.0
"""Run untrusted, model-written Python where it cannot reach anything outside its own run.

The boundary is the kernel's. Each program runs in new user, pid, network, mount, IPC and UTS namespaces,
created with unshare(2) through libc (so every supported Python can do it), as an unprivileged uid/gid that
is neither the caller's nor root and has no supplementary groups:

  * files: a fresh root holding only the system directories and the Python installation, bound read-only;
    a private, size-capped tmpfs at /tmp (the working directory); /dev with null, zero, full, random and
    urandom only; /proc of the sandbox's own pid namespace. The program itself sits read-only in /sandbox.
  * processes: the program is pid 2 under a pid-1 init that the evaluator owns. When the program ends,
    init exits and the kernel kills everything left in the namespace (setsid and double-forked children
    included); a timeout kills init from outside, which does the same. Other processes are invisible.
  * network: an empty network namespace, loopback down.
  * environment: empty; a new session keyring. Limits: CPU time, address space, processes, file size, open
    files, no core dumps. No nested user namespaces (max_user_namespaces = 0 inside).
  * PR_SET_NO_NEW_PRIVS, so nothing it executes can gain privileges. If the evaluator dies, the launcher and
    init die with it (PR_SET_PDEATHSIG), and the namespace with them.

Inside, an in-process guard removes process creation, sockets and destructive file calls before the
candidate runs and ends the program with status "refused" when one is used. It is a second layer that makes
the common case cheap and the status telling; the namespaces are the boundary. The guard also hands back a
per-run token once the program has run to its end, so a program that leaves early with status 0
(sys.exit(0), quit(), os._exit(0): skipping the tests after it) is "failed", not "passed". Code written to
forge the token can (it shares the guard's process); it cannot reach anything outside.

Root callers map the sandbox to host uids/gids from 1,600,000,000 up (two per concurrent slot). Other
callers need `newuidmap`/`newgidmap` (package uidmap) and a range for their user in /etc/subuid and
/etc/subgid. Where isolation cannot be had, `run_program` raises `SandboxUnavailable` naming what is missing;
`isolation="none"` (the CLI's --unsafe-no-isolation) runs with only the guard and the limits, in a new session
and a temporary directory, which code written to escape can leave.

Statuses: passed, failed (an exception or non-zero exit), timeout, memory (MemoryError or RLIMIT_AS),
refused (the guard stopped it), killed (a signal).
"""
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ms_llm.errors import MsLlmError

REFUSED_EXIT, MEMORY_EXIT, SETUP_EXIT = 117, 118, 125
HOST_ID_BASE = 1_600_000_000          # root callers: host uid/gid of slot s are BASE + 2s (setup) and + 1 (program)
INSIDE_ID = 65534                     # the program's uid/gid inside its user namespace
ISOLATIONS = ("namespaces", "none")

GUARD = r'''
import builtins, os, posix, sys
import random, threading     # their imports register fork handlers, denied below: load them whatever site loaded
_os_write, _os_read, _os_open, _os_dup2, _os_close, _os_exit = os.write, os.read, os.open, os.dup2, os.close, os._exit
class SandboxViolation(BaseException):
    pass
def _deny(name):
    def f(*a, **k):
        raise SandboxViolation(name)
    return f
for _mod in (os, posix):
    for _n in ("system", "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
               "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
               "posix_spawn", "posix_spawnp", "popen", "kill", "killpg", "setuid", "putenv", "unsetenv",
               "removedirs", "rmdir", "chmod", "chown", "truncate", "fchdir", "chroot", "unshare", "setns",
               "setsid", "register_at_fork"):
        if hasattr(_mod, _n):
            setattr(_mod, _n, _deny(_mod.__name__ + "." + _n))
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
def _main(done_fd, path):
    nonce = _os_read(0, 64)                      # the evaluator's token for "the program ran to its end"
    _os_dup2(_os_open("/dev/null", os.O_RDWR), 0)
    sys.argv = [path]
    code = compile(open(path, encoding="utf-8", errors="surrogateescape").read(), path, "exec")
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SandboxViolation as e:
        sys.stderr.write("sandbox: refused " + str(e) + "\n")
        _os_exit(REFUSED_EXIT)
    except MemoryError:
        sys.stderr.write("sandbox: out of memory\n")
        _os_exit(MEMORY_EXIT)
    _os_write(done_fd, nonce)                    # not reached after sys.exit(), quit() or os._exit() in the program
    _os_close(done_fd)
_main(int(sys.argv[1]), sys.argv[2])
'''.replace("REFUSED_EXIT", str(REFUSED_EXIT)).replace("MEMORY_EXIT", str(MEMORY_EXIT))

# Runs as `python -I -S -c LAUNCHER CONFIG` with the program on stdin. It unshares the namespaces, waits for
# the evaluator to write its uid/gid maps, forks init (pid 1 of the new pid namespace), which builds the
# file system, pivots into it and forks the program as the unprivileged id. Init reports the program's
# exit ("exit N" / "signal N") or a failed setup step ("setup WHAT: ERROR") on the status pipe.
LAUNCHER = r'''
import ctypes, fcntl, json, os, resource, select, signal, sys
cfg = json.loads(sys.argv[1])
status = cfg["status_fd"]
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
STEP = [""]                                                      # the set-up step under way, for its failure line
def step(what):
    STEP[0] = what
def fail(what):
    where = STEP[0] + " (" + what + ")" if STEP[0] and STEP[0] != what else what
    os.write(status, ("setup " + where + ": " + os.strerror(ctypes.get_errno()) + "\n").encode())
    os._exit(SETUP_EXIT)
def call(ret, what):
    if ret != 0:
        fail(what)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
ATIME = {1024: 1024, 2048: 2048, 4096: 1 << 21}                  # statvfs ST_* bit -> mount MS_* bit
def mount(src, dst, fstype, flags, data=None):
    call(libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), flags,
                    data and data.encode()), "mount " + dst)
def read_only(path):                                             # keep the atime flags the kernel locks
    f = os.statvfs(path).f_flag
    mount(None, path, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV | sum(v for k, v in ATIME.items() if f & k))
program = sys.stdin.buffer.read()
libc.prctl(1, signal.SIGKILL)                                    # PR_SET_PDEATHSIG: die with the evaluator
NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
call(libc.unshare(NEWUSER | NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS), "unshare(user, pid, net, mount, ipc, uts)")
os.write(cfg["ready_fd"], b"R")
if os.read(cfg["go_fd"], 1) != b"G":
    os._exit(SETUP_EXIT)
alive_r, alive_w = os.pipe()                                     # EOF for init once the launcher is gone
init = os.fork()
if init:
    os.close(status)
    os.waitpid(init, 0)
    os._exit(0)
os.close(alive_w)
binds = []                                       # opened in our mount namespace while the host uid (its owner) is still ours
for path in cfg["binds"]:                        # (and links read) before any mount can hide them
    if os.path.islink(path):
        binds.append((path, "link", os.readlink(path)))
    elif os.path.exists(path):
        binds.append((path, "dir" if os.path.isdir(path) else "file", os.open(path, os.O_PATH)))
try:
    os.setgroups([])                                             # host root's groups (0) would stay otherwise
    os.setresgid(0, 0, 0)                                        # the namespace's root: the slot's setup id
    os.setresuid(0, 0, 0)
except OSError as e:
    os.write(status, ("setup become the namespace's root: %s\n" % e).encode())
    os._exit(SETUP_EXIT)
libc.prctl(1, signal.SIGKILL)                                    # set after the uid change, which clears it
if select.select([alive_r], [], [], 0)[0]:                       # the launcher died before that: so do we
    os._exit(SETUP_EXIT)
def build_root():
    """The new root: a fresh tmpfs on a mount point of its own (inside a private scratch tmpfs), so no bound
    path can collide with it. The sandbox's own /dev, /proc and /tmp are made first and the binds after, each
    at its host path, so a Python installed under /tmp, /dev or a symlink into them is bound inside them and
    never hidden by them."""
    step("sethostname")
    call(libc.sethostname(b"sandbox", 7), "sethostname")
    step("make the mounts private")
    mount(None, "/", None, REC | PRIVATE)
    step("mount the scratch tmpfs on /tmp")
    mount("tmpfs", "/tmp", "tmpfs", NOSUID | NODEV, "size=64k,mode=700")
    root = "/tmp/root"
    step("mount the root tmpfs at " + root)
    os.makedirs(root, 0o755)
    mount("tmpfs", root, "tmpfs", NOSUID | NODEV, "size=1m,mode=755")
    step("make /dev")
    os.makedirs(root + "/dev", 0o755)
    mount("tmpfs", root + "/dev", "tmpfs", NOSUID | NOEXEC, "size=64k,mode=755")
    for dev in ("null", "zero", "full", "random", "urandom"):
        step("bind /dev/" + dev)
        open(root + "/dev/" + dev, "w").close()
        mount("/dev/" + dev, root + "/dev/" + dev, None, BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, root + "/dev/" + name)
    step("mount /proc")
    os.makedirs(root + "/proc", 0o755)
    mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)
    step("limit nested user namespaces")                         # none for the program
    with open(root + "/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    step("mount the private /tmp")
    os.makedirs(root + "/tmp", 0o755)
    mount("tmpfs", root + "/tmp", "tmpfs", NOSUID | NODEV, "size=%dk,nr_inodes=4096,mode=1777" % (cfg["file_mb"] * 1024))
    step("write /sandbox/candidate.py")
    os.makedirs(root + "/sandbox", 0o755)
    with open(root + "/sandbox/candidate.py", "wb") as f:
        f.write(program)
    for path, kind, src in binds:
        step("bind " + path)
        target = root + path
        if path == "/proc" or path.startswith("/proc/"):
            raise OSError("a path under /proc cannot be bound into the sandbox's own /proc")
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        if kind == "link":
            os.symlink(src, target)
            continue
        if kind == "dir":
            os.makedirs(target, 0o755, exist_ok=True)
        elif not os.path.exists(target):
            open(target, "w").close()
        mount("/proc/self/fd/%d" % src, target, None, BIND)
        read_only(target)
    step("make /dev read-only")
    read_only(root + "/dev")
    step("pivot_root into " + root)
    os.chdir(root)
    call(libc.syscall({"x86_64": 155, "aarch64": 41}.get(os.uname().machine, 155), b".", b"."), "pivot_root")
    call(libc.umount2(b".", 2), "detach the old root")
    os.chdir("/")
    step("make / read-only")
    read_only("/")
try:
    build_root()
except BaseException as e:                                       # one line naming the step, never a silent death
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    os.write(status, ("setup %s: %s\n" % (STEP[0] or "build the root", reason)).encode())
    os._exit(SETUP_EXIT)
status = fcntl.fcntl(status, fcntl.F_DUPFD_CLOEXEC, 10)          # clear of fds 0-3; closed by exec
nonce = os.urandom(16).hex().encode()
in_r, in_w = os.pipe()
done_r, done_w = os.pipe()
os.write(in_w, nonce)
os.close(in_w)
candidate = os.fork()
if candidate == 0:
    try:
        uid = cfg["inside_id"]
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        call(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
        keyctl = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine, 250)
        if libc.syscall(keyctl, 1, None) < 0:                    # a new session keyring, not the evaluator's
            fail("join a new session keyring")
        lim = cfg["limits"]
        for name, value in (("CPU", lim["cpu_s"]), ("AS", lim["memory_mb"] << 20), ("FSIZE", lim["file_mb"] << 20),
                            ("NOFILE", 64), ("CORE", 0), ("NPROC", lim["nproc"])):
            hard = value + 1 if name == "CPU" else value
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, hard))
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(in_r, 0)                                         # the nonce, which the guard reads first
        os.dup2(null, 1)
        os.dup2(done_w, 3)                                       # where the guard writes it back at the end
        os.closerange(4, status)
        os.closerange(status + 1, 65536)
        os.chdir("/tmp")
        argv = [cfg["python"], "-I", "-c", cfg["guard"], "3", "/sandbox/candidate.py"] if cfg["guard"] else \
               [cfg["python"], "-I", "/sandbox/candidate.py"]
        os.execve(cfg["python"], argv, {})
    except BaseException as e:
        os.write(status, ("setup start the program: %r\n" % (e,)).encode())
    os._exit(SETUP_EXIT)
os.close(done_w)
os.close(in_r)
signal.signal(signal.SIGINT, signal.SIG_DFL)                    # init takes no signal it has no handler for
while True:
    pid, st = os.wait()
    if pid == candidate:
        break
os.set_blocking(done_r, False)
try:
    done = os.read(done_r, 4096) == nonce
except BlockingIOError:
    done = False
code = ("signal %d" % os.WTERMSIG(st)) if os.WIFSIGNALED(st) else ("exit %d" % os.WEXITSTATUS(st))
os.write(status, (code + (" done" if done else "") + "\n").encode())
os._exit(0)
'''.replace("SETUP_EXIT", str(SETUP_EXIT))


class SandboxUnavailable(MsLlmError):
    """Model-written code cannot be isolated on this machine; the message says what is missing."""


@dataclass
class RunResult:
    status: str
    detail: str = ""
    returncode: int = 0
    stderr: str = ""          # the program's last 64 KiB of stderr (its stdout is /dev/null): tools report here


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 1024, file_mb: int = 16,
                isolation: str = "namespaces", guard: bool = True) -> RunResult:
    """Execute `program` (Python source) in the sandbox and classify the outcome.

    isolation: "namespaces" (the boundary; raises SandboxUnavailable where it cannot be had) or "none" (only
    the guard and the limits: the explicit opt-out). guard=False leaves out the in-process guard, which tests
    use to show that the namespaces hold on their own."""
    if isolation not in ISOLATIONS:
        raise MsLlmError(f"sandbox: isolation must be one of {ISOLATIONS}, not {isolation!r}")
    if isolation == "none":
        return _run_unisolated(program, timeout, memory_mb, file_mb, guard)
    require_isolation()
    return _run_isolated(program, timeout, memory_mb, file_mb, guard)


def run_programs(programs: list, timeout: float = 5.0, workers: int = None, **kw) -> list:
    """Run many programs, `workers` at a time (default: the cores this process may use); results in order."""
    workers = min(workers or len(os.sched_getaffinity(0)), 256)
    if kw.get("isolation", "namespaces") == "namespaces" and programs:
        require_isolation()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, timeout=timeout, **kw), programs))


# -- isolation ---------------------------------------------------------------------------------------------

class _Slots:
    """Each sandbox running at once gets its own host uids, so one program's process limit is its own.
    Slots are offset by the evaluator's pid so that two evaluators on one machine rarely share."""
    def __init__(self, n: int = 256):
        self.lock, self.free, self.n = threading.Lock(), list(range(n)), n

    def take(self) -> int:
        with self.lock:
            if not self.free:
                raise RuntimeError("sandbox: more than 256 programs at once")
            return self.free.pop(0)

    def give(self, slot: int):
        with self.lock:
            self.free.append(slot)

    def ids(self, slot: int, base: int, span: int, pid: int = None) -> tuple:
        """(setup id, program id) on the host for `slot` of the evaluator `pid` (default: this process), inside a
        range of `span` ids from `base`."""
        k = (((os.getpid() if pid is None else pid) % 4096) * self.n + slot) % (span // 2)
        return base + 2 * k, base + 2 * k + 1


_SLOTS = _Slots()
_probe = {}


def _subordinate_range(path: str, user: str, uid: int):
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in (user, str(uid)) and int(parts[2]) >= 2:
                    return int(parts[1]), int(parts[2])
    except (OSError, ValueError):
        pass
    return None


def _id_source():
    """How host ids are given to a sandbox: ("root", None) or ("helpers", (uid range, gid range)), or an
    explanation of what is missing."""
    if os.geteuid() == 0:
        return ("root", None), None
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    missing = [t for t in ("newuidmap", "newgidmap") if not shutil.which(t)]
    if missing:
        return None, (f"not root, and {' and '.join(missing)} not found (Debian/Ubuntu package: uidmap), so the "
                      "sandbox cannot run as a uid other than yours")
    ranges = (_subordinate_range("/etc/subuid", user, uid), _subordinate_range("/etc/subgid", user, uid))
    if None in ranges:
        return None, f"not root, and user {user} has no range in /etc/subuid and /etc/subgid (usermod --add-subuids)"
    return ("helpers", ranges), None


def isolation_problem():
    """None when model-written code can be isolated here, else a sentence naming what is missing."""
    if "problem" not in _probe:
        _probe["problem"] = _find_problem()
    return _probe["problem"]


def _find_problem():
    if not sys.platform.startswith("linux"):
        return f"namespaces need Linux (this is {sys.platform})"
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) == 0:
                return "user namespaces are disabled (sysctl user.max_user_namespaces = 0)"
    except (OSError, ValueError):
        pass
    src, why = _id_source()
    if why:
        return why
    try:
        r = _run_isolated("import os\nassert os.getuid() != 0\n", 20.0, 256, 1, True)
    except _SetupError as e:
        hint = ""
        if "unshare" in str(e) and os.path.exists("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"):
            hint = " (AppArmor restricts unprivileged user namespaces: kernel.apparmor_restrict_unprivileged_userns)"
        return f"{e}{hint}"
    if r.status != "passed":
        return f"a trial program did not pass in the sandbox ({r.status}: {r.detail})"
    return None


def require_isolation():
    problem = isolation_problem()
    if problem:
        fix = "Pass" if os.geteuid() == 0 else ("Run as root, or install uidmap with a subordinate id range for "
                                                "your user and allow user namespaces; or pass")
        raise SandboxUnavailable(
            f"sandbox: cannot isolate model-written code on this machine: {problem}. {fix} --unsafe-no-isolation "
            "(Python: isolation='none') to run it with only an in-process guard and resource limits, "
            "which code written to escape can leave (docs/eval.md)")


class _SetupError(RuntimeError):
    pass


def _binds() -> list:
    """Host paths bound read-only at the same path inside: the system directories, the interpreter's prefixes
    (real paths), each symlink on the way to one (a venv made or run through a symlinked folder), ld.so.cache."""
    paths = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    given = (sys.base_prefix, sys.prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    prefixes = {os.path.realpath(p) for p in given}
    for p in sorted(prefixes):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in paths if os.path.isdir(q)
                   and not os.path.islink(q)):
            paths.append(p)
    for p in given:
        parts = os.path.abspath(p).split("/")
        for i in range(2, len(parts) + 1):
            q = "/".join(parts[:i])
            if os.path.islink(q) and q not in paths:
                paths.append(q)
    if os.path.isfile("/etc/ld.so.cache"):
        paths.append("/etc/ld.so.cache")
    return [p for p in paths if os.path.lexists(p)]


def _write_maps(pid: int, slot: int, src):
    kind, ranges = src
    if kind == "root":
        setup, prog = _SLOTS.ids(slot, HOST_ID_BASE, 1 << 24)
        for name in ("uid_map", "gid_map"):
            try:
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(f"0 {setup} 1\n{INSIDE_ID} {prog} 1\n")
            except OSError as e:
                raise _SetupError(f"cannot give the sandbox host ids {setup} and {prog} ({name}: {e.strerror}); "
                                  "is this root inside a container or user namespace that does not map them?") from None
        return setup, prog
    for tool, (start, count) in zip(("newuidmap", "newgidmap"), ranges):
        setup, prog = _SLOTS.ids(slot, start, count)
        r = subprocess.run([tool, str(pid), "0", str(setup), "1", str(INSIDE_ID), str(prog), "1"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise _SetupError(f"{tool} failed: {r.stderr.strip() or r.returncode}")
        if tool == "newuidmap":
            uids = (setup, prog)
    return uids


def _run_isolated(program: str, timeout: float, memory_mb: int, file_mb: int, guard: bool) -> RunResult:
    src, why = _id_source()
    if why:
        raise _SetupError(why)
    slot = _SLOTS.take()
    ours, theirs = [], []            # pipe ends still open here; theirs are closed once the launcher has them
    proc, ids = None, None
    try:
        for _ in range(3):           # status (init -> us), ready (launcher -> us), go (us -> launcher)
            r, w = os.pipe()
            ours.append(r if len(ours) < 2 else w)
            theirs.append(w if len(theirs) < 2 else r)
        (status_r, ready_r, go_w), (status_w, ready_w, go_r) = ours, theirs
        cfg = {"status_fd": status_w, "ready_fd": ready_w, "go_fd": go_r, "inside_id": INSIDE_ID,
               "python": os.path.realpath(sys.executable), "guard": GUARD if guard else "", "binds": _binds(),
               "file_mb": file_mb, "limits": {"cpu_s": int(timeout) + 1, "memory_mb": memory_mb,
                                              "file_mb": file_mb, "nproc": 64}}
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps(cfg)], cwd="/", env={},
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                pass_fds=(status_w, ready_w, go_r), start_new_session=True)
        while theirs:
            os.close(theirs.pop())
        proc.stdin.write(program.encode("utf-8", "surrogatepass"))
        proc.stdin.close()
        proc.stdin = None
        if not (_readable(ready_r, 20.0) and os.read(ready_r, 1) == b"R"):
            _kill_group(proc)
            proc.wait()
            raise _SetupError(_read_all(status_r).strip() or "the launcher did not start")
        ids = _write_maps(proc.pid, slot, src)
        os.write(go_w, b"G")
        t0 = time.monotonic()
        err, timed_out = _collect(proc, timeout + 0.5)             # + the namespace set-up (~0.1 s)
        if timed_out:
            _kill_group(proc)
            proc.wait()
            _wait_gone(ids)
            return RunResult("timeout", f"exceeded {timeout:g} s", -9)
        proc.wait()
        line = _read_all(status_r).strip()
        if line.startswith("setup"):
            raise _SetupError(line)
        if not line:                                             # init was killed: by the clock or the kernel
            if time.monotonic() - t0 >= timeout:
                return RunResult("timeout", f"exceeded {timeout:g} s", -9)
            return RunResult("killed", "the sandbox's init was killed", -9)
        kind, value, *mark = line.split()
        rc = -int(value) if kind == "signal" else int(value)
        return _classify(rc, err, finished=bool(mark) or not guard)
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
            proc.wait()
            if ids:
                _wait_gone(ids)
        for fd in ours + theirs:
            os.close(fd)
        _SLOTS.give(slot)


def _readable(fd: int, timeout: float) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP)
    return bool(p.poll(timeout * 1000))


TAIL = 64 << 10


def _collect(proc, timeout: float, grace: float = 1.0):
    """Read the program's stderr until EOF, keeping its last 64 KiB, for at most `timeout` seconds, and at most
    `grace` seconds after the process itself ended (a child may hold the pipe). Returns (tail, timed_out)."""
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    tail, deadline, ended = bytearray(), time.monotonic() + timeout, False
    while True:
        now = time.monotonic()
        if not ended and proc.poll() is not None:
            ended, deadline = True, min(deadline, now + grace)
        if now >= deadline:
            return bytes(tail), not ended
        if poller.poll(min(deadline - now, 0.05) * 1000):
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                return bytes(tail), False
            tail += chunk
            del tail[:-TAIL]


def _wait_gone(uids, limit: float = 10.0):
    """Block until no process runs as the slot's host uids: a killed init takes its namespace down
    asynchronously, and the slot must not be reused before it is empty."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        alive = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            alive = int(line.split()[1]) in uids
                            break
            except OSError:
                continue
            if alive:
                break
        if not alive:
            return
        time.sleep(0.01)


def _read_all(fd) -> str:
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(b)


def _classify(rc: int, err: bytes, finished: bool = True) -> RunResult:
    """`finished`: the guard saw the program run to its end (False after sys.exit(0), quit() or os._exit(0),
    which would otherwise pass a test they skipped)."""
    full = err.decode(errors="replace")
    result = _classified(rc, full[-2000:], finished)
    result.stderr = full
    return result


def _classified(rc: int, err: str, finished: bool) -> RunResult:
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if rc == 0:
        if not finished:
            return RunResult("failed", "exited with status 0 before the end of the program", 0)
        return RunResult("passed", "", 0)
    if rc == REFUSED_EXIT:
        return RunResult("refused", last, rc)
    if rc == MEMORY_EXIT or "MemoryError" in err:
        return RunResult("memory", "out of memory", rc)
    if rc < 0:
        if -rc == signal.SIGXCPU:
            return RunResult("timeout", "CPU time limit", rc)
        why = "file size limit" if -rc == signal.SIGXFSZ else f"signal {-rc}"
        return RunResult("killed", why, rc)
    return RunResult("failed", last or f"exit {rc}", rc)


# -- the explicit opt-out ------------------------------------------------------------------------------------

# Sets the limits, then becomes the program: `python -I -S -c LIMITS CONFIG PYTHON ARGS...` (no preexec_fn in
# the evaluator, whose pool threads make forking Python code unsafe).
LIMITS = r'''
import json, os, resource, sys
lim = json.loads(sys.argv[1])
for name, value in (("CPU", lim["cpu_s"]), ("AS", lim["memory_mb"] << 20), ("FSIZE", lim["file_mb"] << 20),
                    ("NOFILE", 64), ("CORE", 0), ("NPROC", lim["nproc"])):
    resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value + 1 if name == "CPU" else value))
os.execve(sys.argv[2], sys.argv[2:], lim["env"])
'''


def _run_unisolated(program: str, timeout: float, memory_mb: int, file_mb: int, guard: bool) -> RunResult:
    """The guard, the limits, a new session and a temporary directory: no boundary (see the module doc)."""
    work = tempfile.mkdtemp(prefix="ms_llm_sandbox_")
    done_r, done_w = os.pipe()
    try:
        path = os.path.join(work, "candidate.py")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "PYTHONDONTWRITEBYTECODE": "1"}
        lim = {"cpu_s": int(timeout) + 1, "memory_mb": memory_mb, "file_mb": file_mb, "nproc": 256, "env": env}
        target = ["-I", "-c", GUARD, str(done_w), path] if guard else ["-I", path]
        nonce = os.urandom(16).hex().encode()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LIMITS, json.dumps(lim), sys.executable, *target],
                                cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True, pass_fds=(done_w,))
        os.close(done_w)
        done_w = None
        try:
            proc.stdin.write(nonce)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.stdin = None
        err, timed_out = _collect(proc, timeout)
        _kill_group(proc)                                        # anything it left behind in its session
        if timed_out:
            proc.wait()
            return RunResult("timeout", f"exceeded {timeout:g} s", -9)
        proc.wait()
        os.set_blocking(done_r, False)
        try:
            done = os.read(done_r, 4096) == nonce
        except BlockingIOError:
            done = False
        return _classify(proc.returncode, err, finished=done or not guard)
    finally:
        for fd in (done_r, done_w):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
