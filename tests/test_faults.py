"""Crash and preemption safety of `mscenario train` and `mscenario update`, tried the way they
fail: the process is killed (SIGKILL) or preempted (SIGTERM) at random moments and restarted
until it finishes; the checkpoints and results.json (update: also transform.json,
updates.jsonl and the exported model dir) must equal an uninterrupted run's bit for bit. The
long version (hundreds of kills) is benchmarks/fault_injection.py; counts are in
BENCHMARKS.md."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from mscenario.errors import ConfigError
from tests import faults
from tests.helpers import SYNTHETIC, TINY

# Small and quick, with a mid-epoch checkpoint every 10 steps (31 steps per epoch); reserved
# vocabulary rows so that an update grows the vocabularies.
ARGS = [*TINY, "--config.train.checkpoint_every_steps=10", "--config.train.epochs=2",
        "--config.train.steps_per_call=4", "--config.data.reserve_fraction=0.1"]
# The update: 4 epochs over the last 6,000 rows (some users renamed to new ids), exported.
UPDATE_ARGS = ["--epochs", "4"]


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


@pytest.fixture(scope="module")
def update_reference(reference):
  """The finished train run as the base of every update trial, its export (v0001), the new
  events, and one uninterrupted update of a copy (the reference). Lives are forked from a
  zygote that has the training stack imported (tests/faults.py: Zygote)."""
  root, cache, _ = reference
  zygote = faults.Zygote(cache, str(root))
  try:
    base, base_model, events = root / "ref", root / "ref-model", root / "events.csv"
    faults.write_events(SYNTHETIC, ARGS, str(events), slice(-6000, None))
    life = zygote.start(["export", "--workdir", str(base), "--out", str(base_model),
                         "--buckets", "8"])
    assert life.wait(300) == 0, life.stderr[-3000:]
    ref, ref_model = root / "upd-ref", root / "upd-ref-model"
    shutil.copytree(base, ref)
    shutil.copytree(base_model, ref_model)
    t0 = time.perf_counter()
    life = zygote.start(faults.update_command(ref, events, ref_model, UPDATE_ARGS)[3:])
    assert life.wait(300) == 0, life.stderr[-3000:]
    yield root, zygote, (base, base_model, ref, ref_model, events), time.perf_counter() - t0
  finally:
    zygote.close()


def test_update_killed_at_random_moments_completes_identically(update_reference):
  """SIGKILL and SIGTERM during the update's start-up, training, checkpoint commit,
  updates.jsonl/transform.json writes and export; rerun until it succeeds."""
  root, zygote, dirs, seconds = update_reference
  assert faults.update_differences(dirs[2], dirs[3], dirs[2], dirs[3]) == []
  rec = [json.loads(x) for x in open(dirs[2] / "updates.jsonl")]
  assert len(rec) == 1 and rec[0]["growth"] and not rec[0]["promoted"]
  for name, sig, kills, seed in (("upd-kill", signal.SIGKILL, 6, 2),
                                 ("upd-term", signal.SIGTERM, 4, 3)):
    out = faults.update_campaign(*dirs, root / name, None, kills=kills, window=seconds,
                                 seed=seed, sig=sig, per_trial=kills, args=UPDATE_ARGS,
                                 zygote=zygote)
    assert out["kills"] == kills and out["differences"] == [], out


def test_sigterm_during_update_saves_nothing_and_the_rerun_is_identical(update_reference):
  root, zygote, (base, base_model, ref, ref_model, events), _ = update_reference
  work, model = root / "upd-preempted", root / "upd-preempted-model"
  shutil.copytree(base, work)
  shutil.copytree(base_model, model)
  before = sorted(os.listdir(work / "ckpt")), (work / "transform.json").read_text()
  life = zygote.start(faults.update_command(work, events, model, UPDATE_ARGS)[3:])
  deadline = time.time() + 300
  while "update 1: epoch 1/4" not in life.stderr and life.wait(0.02) is None:
    assert time.time() < deadline
  life.send_signal(signal.SIGTERM)
  assert life.wait(300) == 75, life.stderr[-3000:]
  err = life.stderr
  assert "preempted (SIGTERM) during update 1: stopped before its checkpoint" in err
  assert "Traceback" not in err
  assert (sorted(os.listdir(work / "ckpt")), (work / "transform.json").read_text()) == before
  assert not (work / "updates.jsonl").exists()
  life = zygote.start(faults.update_command(work, events, model, UPDATE_ARGS)[3:])
  assert life.wait(300) == 0, life.stderr[-3000:]
  assert faults.update_differences(ref, ref_model, work, model) == []


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
