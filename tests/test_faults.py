"""Crash and preemption safety of `mscenario train`, tried the way it fails: the process is
killed (SIGKILL) or preempted (SIGTERM) at random moments and restarted until it finishes; the
checkpoints and results.json must equal an uninterrupted run's bit for bit. The long version
(hundreds of kills) is benchmarks/fault_injection.py; counts are in BENCHMARKS.md."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from mscenario.errors import ConfigError
from tests import faults
from tests.helpers import SYNTHETIC, TINY

# Small and quick, with a mid-epoch checkpoint every 10 steps (31 steps per epoch).
ARGS = [*TINY, "--config.train.checkpoint_every_steps=10", "--config.train.epochs=2",
        "--config.train.steps_per_call=4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  root = tmp_path_factory.mktemp("faults")
  cache = str(root / "jax-cache")
  rc, seconds, err = faults.run(SYNTHETIC, root / "ref", ARGS, cache)
  assert rc == 0, err[-3000:]
  rc, seconds, err = faults.run(SYNTHETIC, root / "ref2", ARGS, cache)  # cache warm
  assert rc == 0, err[-3000:]
  assert faults.differences(root / "ref", root / "ref2") == []
  return root, cache, seconds


def test_sigkill_at_random_moments_loses_and_changes_nothing(reference):
  root, cache, seconds = reference
  out = faults.campaign(SYNTHETIC, root / "killed", root / "ref", ARGS, cache, kills=6,
                        window=seconds, seed=0)
  assert out["kills"] == 6 and out["differences"] == [], out


def test_sigterm_saves_at_a_step_boundary_and_resumes_exactly(reference):
  """Preemption: the run saves where it is, says so, exits 75; rerunning continues there."""
  root, cache, _ = reference
  workdir = root / "preempted"
  proc = subprocess.Popen(faults.command(SYNTHETIC, workdir, ARGS), cwd=faults.REPO,
                          env=faults.env(cache), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and metrics.read_text().count("\n") >= 2:
      break
    time.sleep(0.01)
  assert proc.poll() is None, "the run ended before it could be preempted"
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-3000:]
  assert "preempted (SIGTERM): checkpoint saved at step" in err
  assert "Traceback" not in err
  steps = sorted(int(d) for d in os.listdir(workdir / "ckpt") if d.isdigit())
  assert steps and not (workdir / "results.json").exists()
  rc, _, err = faults.run(SYNTHETIC, workdir, ARGS, cache)
  assert rc == 0, err[-3000:]
  assert faults.differences(root / "ref", workdir) == []


def test_sigterm_at_random_moments(reference):
  root, cache, seconds = reference
  out = faults.campaign(SYNTHETIC, root / "terms", root / "ref", ARGS, cache, kills=3,
                        window=seconds, seed=1, sig=signal.SIGTERM)
  assert out["kills"] == 3 and out["differences"] == [], out


def test_resume_on_changed_data_is_refused():
  from mscenario.config import load_config
  from mscenario.train.loop import check_same_data

  class Data:
    fingerprint, path = "new", "/cache/new"
  config = load_config(SYNTHETIC, TINY)
  with pytest.raises(ConfigError, match="trained on other data"):
    check_same_data({"fingerprint": "old", "path": "/cache/old"}, Data(), config)
  check_same_data({"fingerprint": "new"}, Data(), config)
  config.data.allow_changed_data = True
  check_same_data({"fingerprint": "old"}, Data(), config)
