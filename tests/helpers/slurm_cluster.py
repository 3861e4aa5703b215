"""A real one-node SLURM cluster on localhost for tests that run `sbatch --wait` scripts.

Recipe in DESIGN.md ("Local SLURM"); install the daemons with `.ci/slurm-install.sh`. Everything the
cluster writes (config, munge key and socket, state, spool, logs, job output) lives in one temp folder
and every port is picked free, so the system's /etc/slurm and /etc/munge are never used.

    with LocalSlurmCluster() as cluster:          # raises SlurmUnavailable (-> pytest.skip) if not installed
        rc, job_id = cluster.sbatch_wait("job.sh", env={"STEPS": "3"}, args=["--ntasks=2"])
        print(cluster.job_output(job_id))

Runs as root (SlurmUser=root, munged as the munge user). One cluster per process at a time: tests
share one through the session fixture `slurm_cluster` below. The daemons are tied to the thread that
started them (PR_SET_PDEATHSIG), so start the cluster from the main thread.
"""
import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "scancel")
INSTALL_HINT = "run .ci/slurm-install.sh (Debian: slurmctld slurmd slurm-client munge)"


class SlurmUnavailable(Exception):
    """SLURM cannot run here; the message says why (tests `pytest.skip(str(e))`)."""


class SlurmError(RuntimeError):
    """The cluster failed to start, or a job did not finish in time; the message has the log tails."""


def slurm_unavailable_reason():
    """Why a local cluster cannot be started here, or None when it can."""
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        return f"SLURM not installed (missing {', '.join(missing)}); {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (SlurmUser=root, munged started as the munge user)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return f"no 'munge' user (the munge package creates it); {INSTALL_HINT}"
    return None


def _which(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _free_ports(n):
    """n distinct TCP ports that are free on localhost now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _safe_real_memory_mb():
    """Half of the memory available now, in MB: below what slurmd measures, so the node is not drained."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return max(256, info.get("MemAvailable", info["MemTotal"]) // 1024 // 2)


def _tail(path, lines=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"<{e}>"


class LocalSlurmCluster:
    """munged + slurmctld + slurmd on localhost, in a temp folder; a context manager.

    cpus: CPUs of the node (default: the CPUs this process may use); start_timeout: seconds to wait
    for the node to be idle; keep_dir: do not delete the temp folder at exit (to read logs).
    """

    _active_lock = threading.Lock()
    _active = None  # the cluster running in this process, if any

    def __init__(self, cpus=None, start_timeout=120.0, keep_dir=False, partition="debug"):
        self.cpus = cpus or len(os.sched_getaffinity(0))
        self.start_timeout = start_timeout
        self.keep_dir = keep_dir
        self.partition = partition
        self.dir = None
        self.conf = None
        self._procs = {}  # name -> Popen
        self._stdout_paths = {}  # job id -> its output file
        self.last_sbatch_stderr = ""
        self.start_seconds = None
        self._saved_slurm_conf = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        reason = slurm_unavailable_reason()
        if reason:
            raise SlurmUnavailable(reason)
        with LocalSlurmCluster._active_lock:
            if LocalSlurmCluster._active is not None:
                raise SlurmError("a LocalSlurmCluster is already running in this process "
                                 f"({LocalSlurmCluster._active.dir}); share it (session fixture)")
            LocalSlurmCluster._active = self
        t0 = time.monotonic()
        try:
            self._make_dir()
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", self.conf])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", self.conf, "-N", "localhost"])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        self._saved_slurm_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = self.conf
        self.start_seconds = time.monotonic() - t0
        print(f"slurm_cluster: node localhost idle ({self.cpus} CPUs) in {self.start_seconds:.1f} s; "
              f"SLURM_CONF={self.conf}", flush=True)
        return self

    def stop(self):
        """Cancel jobs, stop the daemons, kill anything left of this cluster, remove the temp folder."""
        try:
            if "slurmctld" in self._procs and self._alive("slurmctld"):
                self._run(["scancel", "--full", f"--partition={self.partition}"], check=False, timeout=30)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.squeue():
                    time.sleep(0.5)
            for name in ("slurmd", "slurmctld", "munged"):
                self._terminate(name)
            self._kill_leftovers()
        finally:
            if self._saved_slurm_conf is None:
                if os.environ.get("SLURM_CONF") == self.conf:
                    os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = self._saved_slurm_conf
            self._saved_slurm_conf = None
            if self.dir and not self.keep_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            elif self.dir:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.dir, "owner.pid"))  # stopped cleanly: not an orphan
                print(f"slurm_cluster: kept {self.dir}", flush=True)
            with LocalSlurmCluster._active_lock:
                if LocalSlurmCluster._active is self:
                    LocalSlurmCluster._active = None

    # -- jobs --------------------------------------------------------------------------------------
    @property
    def env(self):
        """Environment for SLURM clients: ours, minus inherited SLURM_* job variables, plus SLURM_CONF."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = self.conf
        return env

    def sbatch_wait(self, script, env=None, args=(), cwd=None, timeout=900):
        """Submit `script` (a path) with `sbatch --wait`; return (returncode, job_id).

        returncode is the job's exit code (sbatch's own on a rejected submission, job_id then None).
        env: extra variables for the job (sbatch exports the whole environment by default).
        args: sbatch options; they override the script's #SBATCH lines. The job runs in `cwd`
        (default: the cluster's jobs/ folder) and, unless the script or args say otherwise, writes
        its output to slurm-<job_id>.out there; read it with job_output(job_id).
        """
        cwd = cwd or os.path.join(self.dir, "jobs")
        full_env = self.env
        full_env.update(env or {})
        cmd = [_which("sbatch"), "--wait", "--parsable", *args, os.path.abspath(script)]
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            job_id = _parse_job_id(out)
            state = self.scontrol_show_job(job_id) if job_id else {}
            if job_id:
                self._run(["scancel", job_id], check=False)
            raise SlurmError(f"sbatch --wait {script} still running after {timeout} s "
                             f"(job {job_id}, state {state.get('JobState')}, reason {state.get('Reason')})"
                             f"\n{self.log_tails()}")
        job_id = _parse_job_id(out)
        self.last_sbatch_stderr = err
        if job_id and proc.returncode >= 0:
            info = self.scontrol_show_job(job_id)
            self._stdout_paths[job_id] = info.get("StdOut")
        elif err:
            print(f"slurm_cluster: sbatch {script} rejected (rc {proc.returncode}): {err.strip()}", flush=True)
        return proc.returncode, job_id

    def job_output(self, job_id):
        """The text of a finished job's output file (its StdOut as scontrol reported it)."""
        path = self._stdout_paths.get(job_id) or self.scontrol_show_job(job_id).get("StdOut")
        if not path:
            raise SlurmError(f"job {job_id}: output file unknown (job purged; pass --output to sbatch)")
        with open(path, errors="replace") as f:
            return f.read()

    def scontrol_show_job(self, job_id):
        """`scontrol show job` as a dict ({} once the job has left the controller, after MinJobAge)."""
        res = self._run(["scontrol", "show", "job", "--oneliner", str(job_id)], check=False)
        if res.returncode != 0:
            return {}
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", res.stdout))

    def squeue(self):
        """Ids of the jobs still known as pending or running."""
        res = self._run(["squeue", "-h", "-o", "%i", "-t", "PD,R,CG,CF,S"], check=False)
        return res.stdout.split() if res.returncode == 0 else []

    def log_tails(self, lines=30):
        """The last lines of the daemons' logs, for error messages."""
        return "\n".join(f"--- {name} log ({path}) ---\n{_tail(path, lines)}"
                         for name, path in self._logs().items())

    # -- internals ---------------------------------------------------------------------------------
    def _logs(self):
        if not self.dir:
            return {}
        return {n: os.path.join(self.dir, "log", f"{n}.log") for n in ("munged", "slurmctld", "slurmd")}

    def _run(self, cmd, check=True, timeout=60):
        cmd = [_which(cmd[0]) or cmd[0], *cmd[1:]]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def _make_dir(self):
        _kill_orphaned_clusters()
        self.dir = tempfile.mkdtemp(prefix=DIR_PREFIX)
        with open(os.path.join(self.dir, "owner.pid"), "w") as f:
            f.write(str(os.getpid()))
        os.chmod(self.dir, 0o711)  # munged (munge user) must traverse it to its own folder
        for sub in ("state", "spool", "log", "run", "jobs"):
            os.makedirs(os.path.join(self.dir, sub))
        self.conf = os.path.join(self.dir, "slurm.conf")

    def _start_munge(self):
        """A private munged: its own key, socket, pid and log, run as the munge user."""
        munge = pwd.getpwnam("munge")
        mdir = os.path.join(self.dir, "munge")
        os.makedirs(mdir)
        os.chmod(mdir, 0o711)  # munged wants its socket folder searchable by all
        key = os.path.join(mdir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        for path in (mdir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        log = self._logs()["munged"]
        open(log, "w").close()
        os.chown(log, munge.pw_uid, munge.pw_gid)
        self.munge_socket = os.path.join(mdir, "munge.socket")
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={mdir}/munged.pid",
                               f"--seed-file={mdir}/munged.seed", f"--log-file={log}"],
                    user=munge.pw_uid, group=munge.pw_gid)
        self._wait_for(lambda: os.path.exists(self.munge_socket), 30, "munged socket")

    def _write_conf(self):
        ctld_port, slurmd_port = _free_ports(2)
        d = self.dir
        lines = {
            "ClusterName": "ccmegatest",
            "SlurmctldHost": "localhost",
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "SlurmctldPort": ctld_port,
            "SlurmdPort": slurmd_port,
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "StateSaveLocation": f"{d}/state",
            "SlurmdSpoolDir": f"{d}/spool",
            "SlurmctldPidFile": f"{d}/run/slurmctld.pid",
            "SlurmdPidFile": f"{d}/run/slurmd.pid",
            "SlurmctldLogFile": self._logs()["slurmctld"],
            "SlurmdLogFile": self._logs()["slurmd"],
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "SchedulerType": "sched/builtin",
            "MpiDefault": "none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            # reject, at submission, jobs that ask for more than the partition has (more nodes,
            # more CPUs): without it they pend forever and `sbatch --wait` hangs
            "EnforcePartLimits": "ALL",
            "ReturnToService": 2,
            # `sbatch --wait` polls after 2 s, then sleeps 4x longer each time while the sleep is below
            # MinJobAge/2 (2, 8, 32 s): 5 keeps it at 2 s. Finished jobs stay in scontrol >= 5 s.
            "MinJobAge": 5,
            "KillWait": 5,
            "InactiveLimit": 0,
            "MailProg": "/bin/true",
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        text += (f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} "
                 f"RealMemory={_safe_real_memory_mb()} State=UNKNOWN\n"
                 f"PartitionName={self.partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n")
        with open(self.conf, "w") as f:
            f.write(text)

    def _spawn(self, name, cmd, **kw):
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "SLURM_CONF": self.conf or "",
               "CCMEGA_SLURM_CLUSTER": self.dir}
        out = open(os.path.join(self.dir, "log", f"{name}.console"), "w")
        # the daemons get SIGKILL if this process dies without stop() (SIGKILL, os._exit)
        self._procs[name] = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             preexec_fn=_die_with_parent, **kw)
        out.close()

    def _alive(self, name):
        p = self._procs.get(name)
        return p is not None and p.poll() is None

    def _wait_for(self, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n in self._procs if not self._alive(n)]
            if dead:
                raise SlurmError(f"{', '.join(dead)} exited while waiting for {what} "
                                 f"(exit {[self._procs[n].returncode for n in dead]})\n{self._diagnostics()}")
            if ready():
                return
            time.sleep(0.25)
        raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}\n{self._diagnostics()}")

    def _diagnostics(self):
        consoles = "\n".join(f"--- {n} console ---\n{_tail(os.path.join(self.dir, 'log', n + '.console'), 10)}"
                             for n in self._procs)
        return f"{self.log_tails()}\n{consoles}"

    def _node_state(self):
        res = self._run(["sinfo", "-h", "-N", "-o", "%T|%E"], check=False, timeout=20)
        return res.stdout.strip() if res.returncode == 0 else ""

    def _wait_idle(self):
        def idle():
            state = self._node_state()
            if state.startswith(("drain", "down", "fail")) and "Not responding" not in state:
                raise SlurmError(f"node localhost is {state}\n{self._diagnostics()}")
            return state.split("|")[0] == "idle"
        self._wait_for(idle, self.start_timeout, "node localhost to be idle in sinfo")

    def _terminate(self, name):
        p = self._procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=20)

    def _kill_leftovers(self):
        """SIGKILL any process (slurmstepd, job tasks) started by or for this cluster that is still alive.

        They are the ones whose environment names this cluster's folder or config.
        """
        if self.dir:
            _kill_cluster_processes(self.dir)


DIR_PREFIX = "ccmega-slurm-"
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _ancestors():
    """This process and its parents (never to be killed, even if their environment names a cluster)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _environs():
    """(pid, environment entries) of the other processes whose environment can be read."""
    skip = _ancestors()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in skip:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                yield int(pid), f.read().split(b"\0")
        except OSError:
            continue


def _kill_cluster_processes(cluster_dir):
    """SIGKILL every process of one cluster: daemons, slurmstepd, job tasks, clients.

    They are the ones whose environment names the cluster's folder (daemons) or config (jobs, sbatch).
    """
    markers = (f"CCMEGA_SLURM_CLUSTER={cluster_dir}".encode(),
               f"SLURM_CONF={os.path.join(cluster_dir, 'slurm.conf')}".encode())
    for pid, environ in _environs():
        if any(m in environ for m in markers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _kill_orphaned_clusters():
    """Clean up clusters whose owner process died without stop() (their jobs outlive the daemons)."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        cluster_dir = os.path.join(tmp, name)
        if not name.startswith(DIR_PREFIX):
            continue
        try:
            with open(os.path.join(cluster_dir, "owner.pid")) as f:
                owner = int(f.read())
            os.kill(owner, 0)
            continue  # owner alive: not ours to touch
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        _kill_cluster_processes(cluster_dir)
        shutil.rmtree(cluster_dir, ignore_errors=True)


_shared = {"cluster": None, "users": 0}
_shared_lock = threading.Lock()


@contextlib.contextmanager
def shared_cluster(**kwargs):
    """The process's one cluster, started on first use and stopped when its last user leaves."""
    with _shared_lock:
        if _shared["cluster"] is None:
            _shared["cluster"] = LocalSlurmCluster(**kwargs).start()
        _shared["users"] += 1
        cluster = _shared["cluster"]
    try:
        yield cluster
    finally:
        with _shared_lock:
            _shared["users"] -= 1
            if _shared["users"] == 0:
                _shared["cluster"] = None
                cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running LocalSlurmCluster shared by the session's tests; skips them, with the reason, if SLURM
    is not installed. Use it with `from slurm_cluster import slurm_cluster  # noqa: F401`."""
    reason = slurm_unavailable_reason()
    if reason:
        print(f"slurm_cluster: skipping, {reason}", flush=True)
        pytest.skip(reason)
    with shared_cluster() as cluster:
        yield cluster


def _parse_job_id(out):
    m = re.search(r"^(\d+)", (out or "").strip())
    return m.group(1) if m else None
