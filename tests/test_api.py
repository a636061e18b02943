"""The Python API (README "Python API" section): train, open, evaluate, predict, export,
state -- each agreeing with what the CLI writes."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

import mscenario as ms
from mscenario import cli
from mscenario.errors import ConfigError, MscenarioError
from tests.helpers import REPO, SYNTHETIC, TINY

COLUMNS = ["user_id", "item_id", "gender", "region", "category", "age_bucket", "scenario",
           "item_text", "label"]


def _overrides(args):
  return dict(a[len("--config."):].split("=", 1) for a in args)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  config = ms.load_config(SYNTHETIC, _overrides(TINY))
  return ms.train(config, str(tmp_path_factory.mktemp("api") / "run"), log=lambda *_: None)


def _test_rows(config):
  from mscenario.data import synthetic
  from mscenario.data.prepare import split_rows
  table = synthetic.load_raw(config.data)
  rows = split_rows(table, config.data, config.seed)["test"][:300]
  return {c: [table.columns[c][i] for i in rows] for c in COLUMNS}


def test_train_then_open_gives_the_same_run(run):
  assert run.results["overall"]["auc"] > 0.6
  again = ms.Run.open(run.path)
  from mscenario.config import to_json
  assert to_json(again.config) == to_json(run.config)
  assert again.results == run.results
  assert any("valid_auc" in r for r in again.metrics)
  assert "test AUC" in repr(again)


def test_evaluate_matches_results_json(run):
  assert ms.Run.open(run.path).evaluate("test")["overall"] == run.results["overall"]
  with pytest.raises(MscenarioError, match="split"):
    run.evaluate("nope")


def test_predict_from_columns_and_from_a_file_agree_with_the_cli(run, tmp_path):
  cols = _test_rows(run.config)
  from_dict = run.predict(cols)
  path = tmp_path / "rows.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(COLUMNS)
    w.writerows(zip(*(cols[c] for c in COLUMNS)))
  from_path = run.predict(str(path))
  out = tmp_path / "preds.csv"
  done = subprocess.run([sys.executable, "-m", "mscenario", "predict", "--workdir", run.path,
                         "--input", str(path), "--output", str(out)], cwd=REPO,
                        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
  assert done.returncode == 0, done.stderr[-2000:]
  from_cli = np.array([float(r["probability"]) for r in csv.DictReader(open(out))])
  assert from_dict.shape == (300,)
  np.testing.assert_array_equal(from_dict, from_path)
  np.testing.assert_allclose(from_path, from_cli, atol=1e-6)  # CLI writes 6 decimals


def test_predict_names_a_bad_row(run):
  cols = _test_rows(run.config)
  cols["age_bucket"][5] = None
  cols["scenario"][7] = "no-such-scenario"
  with pytest.raises(MscenarioError, match="line"):
    run.predict(cols)


def test_state_and_export(run, tmp_path):
  params = run.state("best")
  assert params["embedding"]["table"].shape[1] == run.config.model.embed_dim
  version = run.export(str(tmp_path / "models"), buckets=(8,), log=lambda *_: None)
  assert os.path.isdir(version)


def test_overrides_are_checked():
  with pytest.raises(ConfigError, match="unknown key"):
    ms.load_config(SYNTHETIC, {"model.no_such_key": 1})
  with pytest.raises(TypeError):
    ms.load_config(SYNTHETIC, "model.embed_dim=8")


def test_import_is_light_and_versioned():
  done = subprocess.run([sys.executable, "-c", "import sys, mscenario as ms; "
                         "print(ms.__version__, 'jax' in sys.modules)"], cwd=REPO,
                        capture_output=True, text=True)
  version, jax_loaded = done.stdout.split()
  assert version[0].isdigit() and jax_loaded == "False"


def test_explain_from_columns_and_from_the_cli(run, tmp_path):
  """Run.explain returns what `mscenario explain` writes: per-row attributions that sum to
  logit - baseline logit, and their per-scenario mean |attribution| table."""
  cols = _test_rows(run.config)
  mine = run.explain(input=cols, rows=0, steps=32, out=str(tmp_path / "cols"),
                     log=lambda *_: None)
  assert mine.attributions.shape == (300, len(mine.features)) and len(mine.scenarios) == 3
  gap = mine.logit - mine.baseline_logit
  assert np.abs(gap).mean() > 0.1  # the sum has something to match
  np.testing.assert_allclose(mine.attributions.sum(axis=1), gap, atol=0.02, rtol=0.02)
  assert mine.summary["completeness"]["fraction_within"] == 1.0
  for i, s in enumerate(mine.scenarios):
    np.testing.assert_allclose(mine.table[i],
                               np.abs(mine.attributions[mine.scenario == s]).mean(0), rtol=1e-6)
  assert (tmp_path / "cols" / "explain.json").stat().st_size > 0
  np.testing.assert_array_equal(mine.lines, np.arange(1, 301))  # rows of the columns
  probs = run.predict(cols)
  np.testing.assert_allclose(1 / (1 + np.exp(-mine.logit)), probs, rtol=1e-5, atol=1e-6)
  path = tmp_path / "rows.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(COLUMNS)
    w.writerows(zip(*(cols[c] for c in COLUMNS)))
  assert cli.main(["explain", "--workdir", run.path, "--input", str(path), "--rows", "0",
                   "--steps", "32", "--out", str(tmp_path / "cli")]) == 0
  with open(tmp_path / "cli" / "attributions.csv") as f:
    rows = list(csv.DictReader(f))
  from_cli = np.array([[float(r[k]) for k in mine.features] for r in rows])
  np.testing.assert_allclose(from_cli, mine.attributions, atol=2e-6)  # CSV: 6 decimals
  assert [r["scenario"] for r in rows] == list(mine.scenario)
  assert [int(r["line"]) for r in rows] == list(mine.lines + 1)  # the CSV's header line


def test_update_then_export_once(run, tmp_path):
  """ms.update continues the latest checkpoint on new events and exports the result; the
  same call again finds the events applied and the version already exported."""
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(run.path, workdir)
  cols = _test_rows(run.config)
  path = tmp_path / "events.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(COLUMNS)
    w.writerows(zip(*(cols[c] for c in COLUMNS)))
  quiet = lambda *_: None  # noqa: E731
  first = ms.update(workdir, str(path), out=str(tmp_path / "models"), buckets=(8,), log=quiet)
  assert first["step_to"] > first["step_from"] and os.path.isdir(first["export"])
  again = ms.update(workdir, str(path), out=str(tmp_path / "models"), buckets=(8,), log=quiet)
  assert again["already_applied"] and again["export"] == first["export"]
  assert os.listdir(tmp_path / "models" / "versions") == [os.path.basename(first["export"])]
  # Not promoted (no holdout): best/ is the trained model, the latest state the updated one.
  updated = ms.Run.open(workdir)
  best, latest = updated.predict(cols), updated.predict(cols, checkpoint="latest")
  np.testing.assert_array_equal(best, run.predict(cols))
  assert np.abs(latest - best).max() > 1e-4
  assert (updated.evaluate("test", checkpoint="latest")["overall"]
          != updated.evaluate("test")["overall"])
