"""Metrics against scikit-learn (the reference published numbers are computed with)."""
import json
import math
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from mscenario.metrics import (METRIC_KEYS, accuracy, auc, compute_metrics, evaluate_by_scenario,
                               f1, format_table, gauc, logloss, precision, recall, roc_curve,
                               roc_curves)
from mscenario.metrics.plots import plot_roc, plot_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _data(n=5000, seed=0, tie_decimals=None):
  rng = np.random.default_rng(seed)
  y = (rng.random(n) < 0.4).astype(np.float32)
  s = 1 / (1 + np.exp(-(rng.standard_normal(n) + 1.2 * y)))
  if tie_decimals is not None:
    s = np.round(s, tie_decimals)
  return y, s


def _sk_gauc(y, s, g):
  num = den = 0.0
  for u in np.unique(g):
    m = g == u
    if 0 < y[m].sum() < m.sum():
      num += m.sum() * skm.roc_auc_score(y[m], s[m])
      den += m.sum()
  return num / den


@pytest.mark.parametrize("tie", [None, 1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_auc_matches_sklearn(seed, tie):
  y, s = _data(seed=seed, tie_decimals=tie)
  assert auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_auc_weighted_matches_sklearn():
  y, s = _data(seed=3, tie_decimals=1)
  w = np.random.default_rng(4).random(y.size) * 3
  assert auc(y, s, w) == pytest.approx(skm.roc_auc_score(y, s, sample_weight=w), abs=1e-12)
  # Zero weights behave like dropped rows (padding rows of a final eval batch).
  w[:100] = 0
  assert auc(y, s, w) == pytest.approx(auc(y[100:], s[100:], w[100:]), abs=1e-12)


def test_auc_hand_computed():
  # pos scores {0.9, 0.5}, neg scores {0.5, 0.1}: pairs (0.9>0.5)=1, (0.9>0.1)=1,
  # (0.5=0.5)=1/2, (0.5>0.1)=1 -> 3.5 / 4.
  assert auc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == 0.875
  assert auc([0, 1], [0.2, 0.8]) == 1.0
  assert auc([1, 0], [0.2, 0.8]) == 0.0
  assert auc([1, 0, 1, 0], [0.3, 0.3, 0.3, 0.3]) == 0.5


def test_auc_degenerate_is_nan():
  assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
  assert math.isnan(auc([0, 0], [0.1, 0.2]))
  assert math.isnan(auc([], []))
  assert math.isnan(auc([0, 1], [0.1, float("nan")]))
  assert math.isnan(gauc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]))


def test_logloss_matches_sklearn():
  y, s = _data(seed=5)
  assert logloss(y, s) == pytest.approx(skm.log_loss(y, s), rel=1e-9)
  w = np.random.default_rng(6).random(y.size)
  assert logloss(y, s, weights=w) == pytest.approx(skm.log_loss(y, s, sample_weight=w),
                                                   rel=1e-9)
  # Clipping keeps a confidently wrong row finite.
  assert logloss([1, 0], [0.0, 1.0], eps=1e-7) == pytest.approx(-math.log(1e-7), rel=1e-6)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_thresholded_metrics_match_sklearn(threshold):
  y, s = _data(seed=7, tie_decimals=1)
  pred = s >= threshold
  assert accuracy(y, s, threshold) == pytest.approx(skm.accuracy_score(y, pred))
  assert precision(y, s, threshold) == pytest.approx(skm.precision_score(y, pred))
  assert recall(y, s, threshold) == pytest.approx(skm.recall_score(y, pred))
  assert f1(y, s, threshold) == pytest.approx(skm.f1_score(y, pred))


def test_precision_zero_when_nothing_predicted_positive():
  y = np.array([1, 0, 1])
  s = np.array([0.1, 0.2, 0.3])
  assert precision(y, s) == 0.0
  assert recall(y, s) == 0.0
  assert f1(y, s) == 0.0
  assert precision(y, s) == skm.precision_score(y, s >= 0.5, zero_division=0)


@pytest.mark.parametrize("tie", [None, 1])
def test_gauc_matches_per_group_sklearn(tie):
  y, s = _data(n=4000, seed=8, tie_decimals=tie)
  g = np.random.default_rng(9).integers(0, 150, y.size)
  assert gauc(y, s, g) == pytest.approx(_sk_gauc(y, s, g), abs=1e-12)
  # Non-integer group labels (e.g. raw user-id strings) give the same answer.
  assert gauc(y, s, np.array([f"u{x}" for x in g], dtype=object)) == pytest.approx(
      gauc(y, s, g), abs=1e-12)


def test_gauc_fast():
  rng = np.random.default_rng(10)
  n = 100_000
  y = (rng.random(n) < 0.5).astype(np.float32)
  s = rng.random(n).astype(np.float32)
  g = rng.integers(0, 6040, n)
  t = time.perf_counter()
  gauc(y, s, g)
  assert time.perf_counter() - t < 1.0


def test_roc_curve_matches_sklearn_and_downsamples():
  y, s = _data(n=300, seed=11, tie_decimals=2)
  fpr, tpr, thr = roc_curve(y, s, max_points=0)
  sf, st, sthr = skm.roc_curve(y, s, drop_intermediate=False)
  np.testing.assert_allclose(fpr, sf)
  np.testing.assert_allclose(tpr, st)
  np.testing.assert_allclose(thr[1:], sthr[1:])
  y, s = _data(n=20000, seed=12)
  fpr, tpr, thr = roc_curve(y, s, max_points=200)
  assert fpr.size <= 200 and fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  assert np.trapezoid(tpr, fpr) == pytest.approx(auc(y, s), abs=5e-3)
  assert roc_curve([1, 1], [0.1, 0.2])[0].size == 0


def test_compute_metrics_keys_and_types():
  y, s = _data(seed=13)
  g = np.arange(y.size) % 50
  m = compute_metrics(y, s, g, threshold=0.5)
  assert tuple(m) == METRIC_KEYS
  assert isinstance(m["n"], int) and m["n"] == y.size
  assert all(type(m[k]) is float for k in METRIC_KEYS if k != "n")
  assert m["auc"] == pytest.approx(skm.roc_auc_score(y, s))
  assert m["gauc"] == pytest.approx(_sk_gauc(y, s, g))
  assert m["f1"] == pytest.approx(skm.f1_score(y, s >= 0.5))
  empty = compute_metrics([], [], [])
  assert empty["n"] == 0 and math.isnan(empty["auc"])


def test_evaluate_by_scenario():
  y, s = _data(n=3000, seed=14)
  sc = np.random.default_rng(15).integers(0, 3, y.size)
  g = np.arange(y.size) % 40
  truth = np.clip(s + 0.01, 0, 1)
  res = evaluate_by_scenario(y, s, g, sc, ["a", "b", "c"], 0.5, truth=truth)
  assert set(res) == {"overall", "scenarios"}
  assert list(res["scenarios"]) == ["a", "b", "c"]
  for i, name in enumerate("abc"):
    m = sc == i
    block = res["scenarios"][name]
    assert block["n"] == m.sum()
    assert block["auc"] == pytest.approx(skm.roc_auc_score(y[m], s[m]))
    assert block["bayes_auc"] == pytest.approx(skm.roc_auc_score(y[m], truth[m]))
  assert res["overall"]["n"] == y.size
  assert "bayes_auc" not in evaluate_by_scenario(y, s, g, sc, ["a", "b", "c"])["overall"]
  table = format_table(res)
  lines = table.splitlines()
  assert "Bayes AUC" in lines[0] and "gAUC" in lines[0]
  assert [ln.split()[0] for ln in lines if ln[:1].isalpha()][1:] == ["a", "b", "c", "overall"]
  assert len({len(ln) for ln in lines}) == 1  # fixed width
  # An empty scenario prints dashes instead of crashing.
  res = evaluate_by_scenario(y, s, g, sc, ["a", "b", "c", "empty"], 0.5)
  assert res["scenarios"]["empty"]["n"] == 0
  assert "Bayes" not in format_table(res) and " - " in format_table(res)


def test_plots_write_png(tmp_path):
  y, s = _data(n=2000, seed=16)
  sc = np.arange(y.size) % 2
  curves = roc_curves(y, s, sc, ["s0", "s1"])
  assert set(curves) == {"overall", "s0", "s1"}
  out = plot_roc(curves, str(tmp_path / "roc.png"))
  data = open(out, "rb").read()
  assert data[:8] == PNG_MAGIC and len(data) > 1000

  log = tmp_path / "metrics.jsonl"
  with open(log, "w") as f:
    for step in range(1, 101):
      f.write(json.dumps({"step": step, "loss": 0.7 - step * 1e-3}) + "\n")
      if step % 25 == 0:
        f.write(json.dumps({"step": step, "epoch": step // 25, "valid_auc": 0.7 + step * 1e-3,
                            "valid_gauc": 0.65}) + "\n")
    f.write('{"step": 101, "loss"')  # truncated last line of a killed run
  out = plot_training_curves(str(log), str(tmp_path / "sub" / "curves.png"))
  data = open(out, "rb").read()
  assert data[:8] == PNG_MAGIC and len(data) > 1000
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  assert open(plot_training_curves(str(empty), str(tmp_path / "e.png")), "rb").read(8) == PNG_MAGIC
