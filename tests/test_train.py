"""End-to-end training: outputs, reproducibility, exact resume after SIGKILL, divergence,
eval and predict — on the synthetic world (no download)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from mscenario import cli
from mscenario.config import load_config
from mscenario.metrics import auc
from tests.helpers import REPO, SYNTHETIC, TINY, run_cli, tiny


def _train(workdir, *extra):
  rc = cli.main(["train", "--config", SYNTHETIC, "--workdir", str(workdir), *TINY, *extra])
  assert rc == 0
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _latest_params(workdir):
  ckpt_dir = os.path.join(workdir, "ckpt")
  step = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  restored = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, str(step), "state"))
  return step, restored["params"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  return workdir, _train(workdir)


def test_outputs_and_report(trained):
  workdir, results = trained
  keys = {"auc", "logloss", "gauc", "accuracy", "precision", "recall", "f1", "n"}
  assert results["split"] == "test"
  assert keys <= set(results["overall"])
  assert set(results["scenarios"]) == {"s0", "s1", "s2"}
  for block in results["scenarios"].values():
    assert keys <= set(block)
  assert sum(b["n"] for b in results["scenarios"].values()) == results["overall"]["n"] == 2000
  # Synthetic data knows the true probabilities: the model is between chance and Bayes.
  assert 0.6 < results["overall"]["auc"] <= results["overall"]["bayes_auc"] + 0.02
  for name in ("config.json", "versions.json", "data.json", "transform.json", "roc.png",
               "training_curves.png", "metrics.jsonl"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_lines = [l for l in lines if "loss" in l]
  assert train_lines and all({"step", "loss", "examples_per_sec"} <= set(l) for l in train_lines)
  assert any("valid_auc" in l for l in lines)
  valid = [l for l in lines if "valid_auc" in l]
  assert all({f"valid_auc/{s}" for s in ("s0", "s1", "s2")} <= set(l) for l in valid)
  hparams = os.path.join(workdir, "tensorboard", "hparams")  # the HParams view's run
  assert any(f.startswith("events.out") for f in os.listdir(hparams))
  versions = json.load(open(os.path.join(workdir, "versions.json")))
  assert {"jax", "flax", "optax", "numpy"} <= set(versions)


def test_same_seed_same_metrics(trained, tmp_path):
  _, first = trained
  again = _train(tmp_path / "again")
  assert again["overall"] == first["overall"]
  other = _train(tmp_path / "other", "--config.seed=7")
  assert other["overall"]["auc"] != first["overall"]["auc"]


def test_eval_command_matches_results(trained):
  workdir, results = trained
  assert cli.main(["eval", "--workdir", str(workdir), "--split", "test"]) == 0
  evaluated = json.load(open(os.path.join(workdir, "eval_test.json")))
  assert evaluated["overall"] == results["overall"]


def test_predict_file_scores_raw_rows(trained, tmp_path):
  """Raw test rows through `mscenario predict` give the same AUC as the training report."""
  workdir, results = trained
  from mscenario.data import synthetic
  from mscenario.data.prepare import split_rows
  config = load_config(SYNTHETIC, TINY)
  table = synthetic.load_raw(config.data)
  test_rows = split_rows(table, config.data, config.seed)["test"]
  cols = ["user_id", "item_id", "gender", "region", "category", "age_bucket", "scenario",
          "item_text", "label"]
  path = tmp_path / "rows.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for i in test_rows:
      w.writerow([table.columns[c][i] for c in cols])
  out = tmp_path / "preds.csv"
  assert cli.main(["predict", "--workdir", str(workdir), "--input", str(path), "--output",
                   str(out)]) == 0
  rows = list(csv.DictReader(open(out)))
  assert len(rows) == len(test_rows)
  probs = np.array([float(r["probability"]) for r in rows])
  labels = table.columns["label"][test_rows]
  assert abs(auc(labels, probs) - results["overall"]["auc"]) < 1e-4


@pytest.mark.slow  # 46 s; tests/test_faults.py kills at random moments in CI
def test_resume_after_sigkill_is_exact(tmp_path):
  """A run killed with SIGKILL and restarted ends bit-identical to an uninterrupted run."""
  args = [*TINY, "--config.data.synthetic.num_rows=60000", "--config.train.batch_size=128",
          "--config.train.checkpoint_every_steps=40", "--config.train.epochs=2"]
  ref = tmp_path / "ref"
  done = run_cli(["train", "--config", SYNTHETIC, "--workdir", str(ref), *args])
  assert done.returncode == 0, done.stderr[-2000:]

  killed = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "mscenario", "train", "--config", SYNTHETIC,
                           "--workdir", str(killed), *args], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = killed / "ckpt"
  deadline = time.time() + 300
  while time.time() < deadline:
    steps = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if ckpt_dir.exists() else []
    if steps and int(max(steps, key=int)) >= 80:
      break
    time.sleep(0.01)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert not (killed / "results.json").exists()

  resumed = run_cli(["train", "--config", SYNTHETIC, "--workdir", str(killed), *args])
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from step" in resumed.stdout + resumed.stderr
  step_a, params_a = _latest_params(ref)
  step_b, params_b = _latest_params(killed)
  assert step_a == step_b
  import jax
  for a, b in zip(jax.tree_util.tree_leaves(params_a), jax.tree_util.tree_leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert json.load(open(ref / "results.json")) == json.load(open(killed / "results.json"))


def test_diverging_loss_stops_with_clear_message(tmp_path):
  done = run_cli(["train", "--config", SYNTHETIC, "--workdir", str(tmp_path / "nan"),
                  *tiny("sharedbottom"), "--config.train.optimizer=sgd",
                  "--config.train.learning_rate=1e308", "--config.train.log_every_steps=1"])
  assert done.returncode == 2, done.stderr[-2000:]
  assert "diverged" in done.stderr and "Traceback" not in done.stderr


def test_changed_config_in_existing_workdir_is_refused(trained):
  workdir, _ = trained
  rc = cli.main(["train", "--config", SYNTHETIC, "--workdir", str(workdir), *TINY,
                 "--config.model.embed_dim=8"])
  assert rc == 2
