"""The launch scripts: syntax, and what their --dry-run says they would run."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("local_multihost.sh", "tpu_vm.sh", "slurm.sbatch")
TRAIN = ["train", "--config", "configs/synthetic.py", "--workdir", "/tmp/my run",
         "--config.mesh.data=2", "--config.mesh.model=2"]


def _bash(script, *args, env=None):
  # The caller's XLA_FLAGS (e.g. --xla_cpu_max_isa to imitate another CPU) would be passed
  # through by the launchers and change the printed commands.
  full = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **(env or {})}
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                        text=True, timeout=60, env=full, cwd=REPO)


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_help(script):
  path = os.path.join(LAUNCH, script)
  assert os.access(path, os.X_OK), f"{script} is not executable"
  check = subprocess.run(["bash", "-n", path], capture_output=True, text=True, timeout=30)
  assert check.returncode == 0, check.stderr
  assert "--dry-run" in open(path).read()
  shown = _bash(script, "--help")
  assert shown.returncode == 0 and "Usage" in shown.stdout


def test_local_multihost_dry_run():
  r = _bash("local_multihost.sh", "3", "--port", "12345", "--devices-per-process", "2",
            "--dry-run", "--", *TRAIN, env={"PYTHON": "python3"})
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words[:5])
    assert env == {"MSCENARIO_COORDINATOR": "127.0.0.1:12345", "MSCENARIO_NUM_PROCESSES": "3",
                   "MSCENARIO_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert words[5:8] == ["python3", "-m", "mscenario"]
    assert words[8:8 + len(TRAIN)] == TRAIN
    if i == 0:
      assert len(words) == 8 + len(TRAIN)  # process 0 writes to the terminal
    else:
      assert words[8 + len(TRAIN):] == [">", f"/tmp/my run/proc_{i}.log", "2>&1"]


def test_local_multihost_picks_a_free_port_and_checks_arguments():
  r = _bash("local_multihost.sh", "2", "--dry-run", "--", "train", "--workdir", "w")
  assert r.returncode == 0, r.stderr
  ports = {l.split()[0] for l in r.stdout.splitlines()}
  assert len(ports) == 1 and ports.pop().startswith("MSCENARIO_COORDINATOR=127.0.0.1:")
  assert "device_count=1" in r.stdout  # default: one device per process
  for bad in (["0", "--", "train"], ["x", "--", "train"], ["2", "--bogus", "--", "train"],
              ["2", "--"], ["2", "--timeout", "soon", "--", "train"]):
    r = _bash("local_multihost.sh", *bad, "--dry-run")
    assert r.returncode != 0 and "local_multihost:" in r.stderr, bad


def test_local_multihost_stops_everything_when_one_fails(tmp_path):
  """A fake interpreter: process 1 fails at once, process 0 would run for a minute."""
  fake = tmp_path / "fakepython"
  fake.write_text("#!/usr/bin/env bash\n"
                  "echo \"pid $$ $MSCENARIO_PROCESS_ID\" >> \"$MARKS\"\n"
                  "if [ \"$MSCENARIO_PROCESS_ID\" = 1 ]; then echo boom; exit 7; fi\n"
                  "exec sleep 60\n")
  fake.chmod(0o755)
  marks = tmp_path / "marks"
  r = subprocess.run(["bash", os.path.join(LAUNCH, "local_multihost.sh"), "2", "--log-dir",
                      str(tmp_path), "--", "train"], capture_output=True, text=True,
                     timeout=30, env={**os.environ, "PYTHON": str(fake), "MARKS": str(marks)})
  assert r.returncode == 7, r.stderr
  assert "process 1 exited with status 7" in r.stderr and "boom" in r.stderr
  for line in marks.read_text().splitlines():  # every process is gone
    pid = int(line.split()[1])
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_local_multihost_timeout(tmp_path):
  fake = tmp_path / "fakepython"
  fake.write_text("#!/usr/bin/env bash\nexec sleep 60\n")
  fake.chmod(0o755)
  r = subprocess.run(["bash", os.path.join(LAUNCH, "local_multihost.sh"), "2", "--timeout", "2",
                      "--log-dir", str(tmp_path), "--", "train"], capture_output=True,
                     text=True, timeout=30, env={**os.environ, "PYTHON": str(fake)})
  assert r.returncode == 124 and "timed out" in r.stderr


TPU = ["--name", "ms-pod", "--zone", "us-west4-a", "--project", "proj"]


def _gcloud(stdout):
  return [shlex.split(l) for l in stdout.splitlines() if l.startswith("gcloud ")]


def _remote(cmd):
  """The shell code a `gcloud ... ssh --command=...` runs on the workers."""
  return next(w for w in cmd if w.startswith("--command=")).split("=", 1)[1]


def _words(code):
  """Shell words of `code`, with ; & | < > as words of their own."""
  lex = shlex.shlex(code, posix=True, punctuation_chars=True)
  lex.whitespace_split = True
  return list(lex)


def test_tpu_vm_dry_run():
  r = _bash("tpu_vm.sh", *TPU, "--create", "--accelerator", "v5litepod-16",
            "--version", "tpu-ubuntu2204-base", "--env", "A=b c", "--dry-run", "--", *TRAIN)
  assert r.returncode == 0, r.stderr
  create, scp, install, start = _gcloud(r.stdout)
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ms-pod"]
  assert {"--zone=us-west4-a", "--project=proj", "--accelerator-type=v5litepod-16",
          "--version=tpu-ubuntu2204-base"} <= set(create)
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
  for cmd in (scp, install, start):
    assert "--worker=all" in cmd and "--zone=us-west4-a" in cmd and "--project=proj" in cmd
  for cmd in (install, start):
    assert cmd[4] == "ssh" and cmd[5] == "ms-pod"
  install_cmd = _remote(install)
  assert "jax[tpu]" in install_cmd and "-e $HOME/mscenario" in install_cmd
  assert "constraints.txt" in install_cmd  # the tested versions, where the tree has them
  # The run is detached: its own session, no terminal, output and pid in per-worker files.
  code = _remote(start)
  assert "f=$HOME/mscenario-logs/worker-$h" in code and "h=$(hostname)" in code
  words = _words(code)
  i = words.index("nohup")
  assert words[i:i + 4] == ["nohup", "setsid", "bash", "-c"]
  # stdout and stderr to the log, stdin from /dev/null, in the background (shlex splits 2>&1)
  assert words[i + 5:i + 13] == [">", "$f.log", "2", ">&", "1", "<", "/dev/null", "&"]
  wrapper = words[i + 4]
  assert "echo $$ > $f.pid" in wrapper and "> $f.exit.tmp && mv -f $f.exit.tmp $f.exit" in wrapper
  assert "trap : TERM INT" in wrapper
  remote = _words(wrapper)
  assert {"MSCENARIO_DISTRIBUTED=auto", "A=b c"} <= set(remote)
  j = remote.index("mscenario", remote.index("-m"))
  assert remote[j + 1:j + 1 + len(TRAIN) + 1] == [*TRAIN, ";"]  # arguments survive 3 shells
  assert "tpu_vm.sh --name ms-pod --zone=us-west4-a --project=proj --status" in r.stderr
  # Nothing is created or copied unless asked.
  r = _bash("tpu_vm.sh", "--name", "ms-pod", "--zone", "z", "--no-copy", "--no-install",
            "--dry-run", "--", "train")
  assert [l.split()[4] for l in r.stdout.splitlines()] == ["ssh"]


def test_tpu_vm_actions_dry_run():
  def action(*args):
    r = _bash("tpu_vm.sh", *TPU, "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    cmds = _gcloud(r.stdout)
    assert len(cmds) == len(r.stdout.splitlines())  # every command is printed, nothing else
    for cmd in cmds:
      assert cmd[4:6] == ["ssh", "ms-pod"] and "--zone=us-west4-a" in cmd
    return cmds

  (status,) = action("--status")
  code = _remote(status)
  assert "--worker=all" in status and "f=$HOME/mscenario-logs/worker-$h" in code
  assert "$f.pid" in code and "$f.exit" in code and "tail -c 65536 $f.log" in code
  assert "ps -ww -o args= -s" in code  # alive = the pid file's session still runs mscenario
  (logs,) = action("--logs", "--lines", "7", "--worker", "0")
  assert "--worker=0" in logs and "tail -n 7" in _remote(logs) and "$f.log" in _remote(logs)
  term, wait = action("--stop")
  assert "--worker=all" in term and "--worker=all" in wait
  assert 'kill -TERM -- -"$(cat $f.pid)"' in _remote(term)
  assert "-lt 300" in _remote(wait) and "kill -KILL" not in _remote(term) + _remote(wait)
  assert "$f.exit" in _remote(wait)
  term, wait = action("--stop", "--force", "--wait", "20", "--worker", "1-3")
  assert "--worker=1-3" in term and 'kill -TERM -- -"$(cat $f.pid)"' in _remote(term)
  assert "-lt 20" in _remote(wait) and 'kill -KILL -- -"$(cat $f.pid)"' in _remote(wait)
  assert "kill -KILL" not in _remote(term)  # SIGKILL only after the wait
  (status,) = action("--status", "--remote-dir", "ms2")
  assert "f=$HOME/ms2-logs/worker-$h" in _remote(status)


@pytest.mark.parametrize("bad", [
    ["--zone", "z", "--", "train"],                      # no --name
    ["--name", "n", "--zone", "z"],                      # start without mscenario arguments
    ["--name", "n", "--zone", "z", "--bogus", "--", "train"],
    ["--name", "n", "--zone", "z", "--status", "--", "train"],
    ["--name", "n", "--zone", "z", "--status", "--stop"],
    ["--name", "n", "--zone", "z", "--logs", "--create"],
    ["--name", "n", "--zone", "z", "--force", "--", "train"],
    ["--name", "n", "--zone", "z", "--status", "--wait", "5"],
    ["--name", "n", "--zone", "z", "--stop", "--wait", "soon"],
    ["--name", "n", "--zone", "z", "--logs", "--lines", "0"],
    ["--name", "n", "--zone", "z", "--logs", "--worker", "w1"],
    ["--name", "n", "--zone", "z", "--worker", "0", "--", "train"],
    ["--name", "n", "--zone", "z", "--env", "NOVALUE", "--", "train"],
    ["--name", "n", "--zone", "z", "--remote-dir", "a/b", "--status"],
    ["--name", "n", "--zone", "z", "--status", "--lines"],  # option without its value
])
def test_tpu_vm_bad_arguments(bad):
  r = _bash("tpu_vm.sh", *bad, "--dry-run")
  assert r.returncode == 2 and "tpu_vm:" in r.stderr and r.stdout == "", (bad, r.stderr)


_FAKE = """#!{python}
import signal, sys, time
if {ignore_term}:
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
  signal.signal(signal.SIGTERM, lambda *a: (print("checkpoint saved", flush=True), sys.exit(75)))
print("args", sys.argv[1:], flush=True)
for i in range(600):
  print(f"\\rstep {{i}}", end="", file=sys.stderr, flush=True)
  time.sleep(0.1)
"""


@pytest.mark.skipif(not all(shutil.which(c) for c in ("setsid", "nohup", "ps", "hostname")),
                    reason="needs setsid, nohup, ps and hostname")
@pytest.mark.parametrize("ignore_term", [False, True])
def test_tpu_vm_detached_run_on_a_fake_worker(tmp_path, ignore_term):
  """The remote commands of the dry run, run here with HOME=tmp_path as one worker: the run
  survives the hangup of the ssh session that started it; --status, --logs, --stop (SIGTERM:
  exit 75, recorded) and --stop --force (SIGKILL after the wait) do what they say."""
  fake = tmp_path / "mscenario" / ".venv" / "bin" / "python"
  fake.parent.mkdir(parents=True)
  fake.write_text(_FAKE.format(python=sys.executable, ignore_term=ignore_term))
  fake.chmod(0o755)
  env = {**os.environ, "HOME": str(tmp_path)}

  def remote(*args):
    r = _bash("tpu_vm.sh", "--name", "n", "--zone", "z", "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    return [_remote(c) for c in _gcloud(r.stdout)]

  def on_worker(code, timeout=30):
    return subprocess.run(["bash", "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout)

  (start,) = remote("--no-copy", "--no-install", "--", "train", "--workdir", "/tmp/a b")
  (status,) = remote("--status")
  (logs,) = remote("--logs", "--lines", "3")
  host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
  files = tmp_path / "mscenario-logs"
  log, pidf, exitf = (files / f"worker-{host}.{x}" for x in ("log", "pid", "exit"))
  # The "ssh session": the start command in a session of its own that stays open, then hangs up.
  # SIGHUP's default action for the child: a runner started under nohup would hand SIG_IGN
  # down, and then neither the "dropped connection" below nor the run's survival would mean
  # much. (Set around the spawn, not in a preexec_fn: forking a JAX process is unsafe.)
  hup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
  try:
    ssh = subprocess.Popen(["bash", "-c", start + "; sleep 60"], env=env,
                           start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  finally:
    signal.signal(signal.SIGHUP, hup)
  try:
    deadline = time.time() + 20
    while not (log.exists() and "step 2" in log.read_text()) and time.time() < deadline:
      time.sleep(0.1)
    pgid = int(pidf.read_text())
    assert pgid != ssh.pid and os.getsid(pgid) == pgid  # its own session
    os.killpg(ssh.pid, signal.SIGHUP)  # the connection drops
    ssh.wait(10)
    assert "started, process group" in ssh.stdout.read()
    r = on_worker(status)
    assert f"{host}: running, process group {pgid}" in r.stdout, r.stdout + r.stderr
    assert f"{host}: last log line: step " in r.stdout
    assert "args ['-m', 'mscenario', 'train', '--workdir', '/tmp/a b']" in log.read_text()
    r = on_worker(logs)
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"==> {host}: ") and len(lines) == 4 and lines[-1].startswith("step")
    r = on_worker(start)  # a second start on a live run is refused
    assert r.returncode == 1 and "a run is alive here" in r.stderr and not exitf.exists()
    term, wait = remote("--stop", "--wait", "2")
    assert f"{host}: sent SIGTERM to process group {pgid}" in on_worker(term).stdout
    r = on_worker(wait)
    if not ignore_term:
      assert r.returncode == 0 and f"{host}: stopped, exit status 75 (stopped by SIGTERM" in r.stdout
      assert exitf.read_text().strip() == "75" and "checkpoint saved" in log.read_text()
      assert "tpu_vm: exited with status 75" in log.read_text()
    else:
      assert r.returncode == 1 and "still running after 2s" in r.stdout
      term, wait = remote("--stop", "--wait", "1", "--force")
      r = on_worker(wait)
      assert r.returncode == 0 and "sent SIGKILL" in r.stdout, r.stdout + r.stderr
      assert exitf.read_text().strip() == "137"
    left = subprocess.run(["ps", "-o", "stat=", "-s", str(pgid)], capture_output=True,
                          text=True).stdout.split()
    assert all(st.startswith("Z") for st in left), left  # gone (zombies wait for init here)
    r = on_worker(status)
    assert f"{host}: not running, exit status {137 if ignore_term else 75}" in r.stdout
    r = on_worker(remote("--stop", "--wait", "1")[0])
    assert f"{host}: not running" in r.stdout
  finally:
    for pid in (ssh.pid, *([int(pidf.read_text())] if pidf.exists() else [])):
      try:
        os.killpg(pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError, ValueError):
        pass


@pytest.mark.parametrize("how", ["flag", "env"])
def test_slurm_dry_run(how):
  args, env = (["--dry-run", "--", *TRAIN], None) if how == "flag" else \
      (["--", *TRAIN], {"DRY_RUN": "1"})
  r = _bash("slurm.sbatch", *args, env={**(env or {}), "PYTHON": "python3",
                                         "SRUN_ARGS": "--mpi=none"})
  assert r.returncode == 0, r.stderr
  words = shlex.split(r.stdout.strip())
  assert words[0] == "srun" and "--kill-on-bad-exit=1" in words and "--mpi=none" in words
  i = words.index("python3")
  assert words[i + 1:] == ["-m", "mscenario", *TRAIN]
  text = open(os.path.join(LAUNCH, "slurm.sbatch")).read()
  assert "#SBATCH --ntasks-per-node" in text and "#SBATCH --gpus-per-node" in text
