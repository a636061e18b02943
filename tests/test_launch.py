"""The launch scripts: syntax, and what their --dry-run says they would run."""
from __future__ import annotations

import os
import shlex
import subprocess

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


def test_tpu_vm_dry_run():
  r = _bash("tpu_vm.sh", "--name", "ms-pod", "--zone", "us-west4-a", "--project", "proj",
            "--create", "--accelerator", "v5litepod-16", "--version", "tpu-ubuntu2204-base",
            "--dry-run", "--", *TRAIN)
  assert r.returncode == 0, r.stderr
  gcloud = [shlex.split(l) for l in r.stdout.splitlines() if l.startswith("gcloud ")]
  create, scp, install, run = gcloud
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ms-pod"]
  assert {"--zone=us-west4-a", "--project=proj", "--accelerator-type=v5litepod-16",
          "--version=tpu-ubuntu2204-base"} <= set(create)
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
  for cmd in (scp, install, run):
    assert "--worker=all" in cmd and "--zone=us-west4-a" in cmd and "--project=proj" in cmd
  for cmd in (install, run):
    assert cmd[4] == "ssh" and cmd[5] == "ms-pod"
  install_cmd = next(w for w in install if w.startswith("--command="))
  assert "jax[tpu]" in install_cmd and "-e $HOME/mscenario" in install_cmd
  remote = shlex.split(next(w for w in run if w.startswith("--command=")).split("=", 1)[1])
  assert "MSCENARIO_DISTRIBUTED=auto" in remote
  i = remote.index("mscenario", remote.index("-m"))
  assert remote[i + 1:] == TRAIN  # arguments survive both shells intact
  # Nothing is created or copied unless asked.
  r = _bash("tpu_vm.sh", "--name", "ms-pod", "--zone", "z", "--no-copy", "--no-install",
            "--dry-run", "--", "train")
  assert [l.split()[4] for l in r.stdout.splitlines()] == ["ssh"]
  r = _bash("tpu_vm.sh", "--zone", "z", "--dry-run", "--", "train")
  assert r.returncode != 0 and "--name" in r.stderr


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
