"""Exact binary-classification metrics in numpy, fast enough for ~10^6 rows per call.

All functions take 1-D array-likes. Labels are 0/1 (anything > 0.5 counts as positive), scores
or probabilities are floats. AUCs are exact (no histogram binning): tied scores count 1/2, which
is what scikit-learn's trapezoidal ROC AUC gives, so our numbers compare with published ones.
Metrics that are undefined on the given data (one class only, no rows, NaN scores) return nan
rather than raising, so that one degenerate scenario cannot abort an evaluation.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

METRIC_KEYS = ("auc", "logloss", "gauc", "accuracy", "precision", "recall", "f1", "n")


def _as_labels(labels) -> np.ndarray:
  return np.asarray(labels).reshape(-1) > 0.5


def _as_float(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64).reshape(-1)


def _as_scores(x) -> np.ndarray:
  """Scores keep float32 if given (sorting it is faster; the order is the same)."""
  a = np.asarray(x).reshape(-1)
  return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def _check_len(*arrays: np.ndarray) -> None:
  n = arrays[0].shape[0]
  for a in arrays[1:]:
    if a.shape[0] != n:
      raise ValueError(f"metric inputs differ in length: {[x.shape[0] for x in arrays]}")


def auc(labels, scores, weights=None) -> float:
  """Exact ROC AUC (Mann-Whitney with average ranks for ties), O(n log n).

  Rows are sorted by score once; each run of tied scores contributes
  `pos_weight(run) * (neg_weight(below run) + neg_weight(run) / 2)`, which equals the
  average-rank formula and, with weights, scikit-learn's weighted trapezoidal AUC.
  Returns nan when only one class (of positive weight) is present or any score is NaN.
  """
  y = _as_labels(labels)
  s = _as_scores(scores)
  w = np.ones(s.shape, np.float64) if weights is None else _as_float(weights)
  _check_len(y, s, w)
  if s.size == 0 or np.isnan(s).any():
    return float("nan")
  order = np.argsort(s)  # tie order is irrelevant: ties are summed per run below
  s, y, w = s[order], y[order], w[order]
  pos = np.where(y, w, 0.0)
  neg = w - pos
  starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
  p_run = np.add.reduceat(pos, starts)
  n_run = np.add.reduceat(neg, starts)
  p_tot, n_tot = p_run.sum(), n_run.sum()
  if p_tot <= 0 or n_tot <= 0:
    return float("nan")
  neg_below = np.cumsum(n_run) - n_run
  return float(np.dot(p_run, neg_below + 0.5 * n_run) / (p_tot * n_tot))


def gauc(labels, scores, groups) -> float:
  """Group AUC: per-group AUC averaged with weights = group row count.

  Only groups holding both classes take part (the usual definition in recommender papers,
  groups = users). Fully vectorised: one lexsort by (group, score), then per-run and per-group
  sums with `reduceat` / `bincount`, so 10^5 groups cost the same as one. nan if no group
  has both classes.
  """
  y = _as_labels(labels)
  s = _as_scores(scores)
  g = np.asarray(groups).reshape(-1)
  _check_len(y, s, g)
  if s.size == 0 or np.isnan(s).any():
    return float("nan")
  if not np.issubdtype(g.dtype, np.integer):
    _, g = np.unique(g, return_inverse=True)
  order = np.lexsort((s, g))
  s, y, g = s[order], y[order], g[order]
  new_group = np.concatenate(([True], g[1:] != g[:-1]))
  new_run = new_group.copy()
  new_run[1:] |= s[1:] != s[:-1]
  starts = np.flatnonzero(new_run)
  p_run = np.add.reduceat(y.astype(np.float64), starts)
  n_run = np.diff(np.append(starts, s.size)).astype(np.float64) - p_run
  run_new_group = new_group[starts]
  grp = np.cumsum(run_new_group) - 1          # dense group index of each run
  cum_n = np.cumsum(n_run)
  before = cum_n - n_run                      # negatives before this run, over all groups
  neg_below = before - before[run_new_group][grp]
  num = np.bincount(grp, p_run * (neg_below + 0.5 * n_run))
  p_g = np.bincount(grp, p_run)
  n_g = np.bincount(grp, n_run)
  ok = (p_g > 0) & (n_g > 0)
  if not ok.any():
    return float("nan")
  count = p_g[ok] + n_g[ok]
  per_group = num[ok] / (p_g[ok] * n_g[ok])
  return float(np.dot(count, per_group) / count.sum())


def logloss(labels, probs, eps: float = 1e-7, weights=None) -> float:
  """Mean binary cross-entropy with probabilities clipped to [eps, 1 - eps].

  Clipping keeps one confidently wrong row from making the mean infinite.
  """
  y = _as_labels(labels).astype(np.float64)
  p = np.clip(_as_float(probs), eps, 1.0 - eps)
  _check_len(y, p)
  if p.size == 0:
    return float("nan")
  ll = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
  if weights is None:
    return float(ll.mean())
  w = _as_float(weights)
  _check_len(y, w)
  return float(np.dot(w, ll) / w.sum()) if w.sum() > 0 else float("nan")


def _confusion(labels, probs, threshold: float) -> tuple[int, int, int, int]:
  """(tp, fp, fn, tn) with prediction = prob >= threshold."""
  y = _as_labels(labels)
  pred = _as_float(probs) >= threshold
  _check_len(y, pred)
  tp = int(np.count_nonzero(pred & y))
  fp = int(np.count_nonzero(pred & ~y))
  fn = int(np.count_nonzero(~pred & y))
  return tp, fp, fn, int(y.size - tp - fp - fn)


def accuracy(labels, probs, threshold: float = 0.5) -> float:
  """Share of rows where (prob >= threshold) equals the label; nan for no rows."""
  tp, fp, fn, tn = _confusion(labels, probs, threshold)
  n = tp + fp + fn + tn
  return (tp + tn) / n if n else float("nan")


def precision(labels, probs, threshold: float = 0.5) -> float:
  """tp / (tp + fp); 0.0 when nothing is predicted positive (scikit-learn's zero_division=0)."""
  tp, fp, _, _ = _confusion(labels, probs, threshold)
  return tp / (tp + fp) if tp + fp else 0.0


def recall(labels, probs, threshold: float = 0.5) -> float:
  """tp / (tp + fn); 0.0 when there are no positive rows (zero_division=0)."""
  tp, _, fn, _ = _confusion(labels, probs, threshold)
  return tp / (tp + fn) if tp + fn else 0.0


def f1(labels, probs, threshold: float = 0.5) -> float:
  """Harmonic mean of precision and recall, 2tp / (2tp + fp + fn); 0.0 when undefined."""
  tp, fp, fn, _ = _confusion(labels, probs, threshold)
  d = 2 * tp + fp + fn
  return 2 * tp / d if d else 0.0


def roc_curve(labels, scores, max_points: int = 200):
  """ROC curve `(fpr, tpr, thresholds)` at distinct score thresholds, descending.

  Starts at (0, 0) with threshold +inf (as scikit-learn does) and ends at (1, 1). Curves of
  10^6 rows have up to 10^6 corners; for plotting we keep at most `max_points` of them, evenly
  spaced along the curve, always keeping both ends. Empty arrays when a class is missing.
  """
  y = _as_labels(labels)
  s = _as_scores(scores)
  _check_len(y, s)
  order = np.argsort(-s, kind="stable")
  s, y = s[order], y[order]
  last = np.flatnonzero(np.concatenate((s[1:] != s[:-1], [True]))) if s.size else np.array(
      [], dtype=np.int64)
  tps = np.cumsum(y)[last].astype(np.float64)
  fps = (last + 1) - tps
  if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
    return np.zeros(0), np.zeros(0), np.zeros(0)
  fpr = np.concatenate(([0.0], fps / fps[-1]))
  tpr = np.concatenate(([0.0], tps / tps[-1]))
  thr = np.concatenate(([np.inf], s[last].astype(np.float64)))
  if max_points and fpr.size > max_points:
    keep = np.unique(np.round(np.linspace(0, fpr.size - 1, max(max_points, 2))).astype(np.int64))
    fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
  return fpr, tpr, thr


def compute_metrics(labels, probs, groups=None, threshold: float = 0.5) -> dict:
  """All headline metrics of one set of rows, keys `METRIC_KEYS` (floats; `n` an int).

  `groups` (e.g. user ids) feeds gAUC; None gives gauc = nan.
  """
  y = _as_labels(labels)
  p = _as_float(probs)
  _check_len(y, p)
  out = {
      "auc": auc(y, p),
      "logloss": logloss(y, p),
      "gauc": float("nan") if groups is None else gauc(y, p, groups),
  }
  tp, fp, fn, tn = _confusion(y, p, threshold)
  n = tp + fp + fn + tn
  out["accuracy"] = (tp + tn) / n if n else float("nan")
  out["precision"] = tp / (tp + fp) if tp + fp else 0.0
  out["recall"] = tp / (tp + fn) if tp + fn else 0.0
  out["f1"] = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0
  out["n"] = int(n)
  return {k: (v if k == "n" else float(v)) for k, v in out.items()}


def _scenario_masks(scenarios, scenario_names: Sequence[str]):
  sc = np.asarray(scenarios).reshape(-1)
  for i, name in enumerate(scenario_names):
    yield name, (sc == i) if np.issubdtype(sc.dtype, np.integer) else (sc == name)


def evaluate_by_scenario(labels, probs, groups, scenarios, scenario_names: Sequence[str],
                         threshold: float = 0.5, truth=None) -> dict:
  """`{"overall": metrics, "scenarios": {name: metrics}}` with `compute_metrics` blocks.

  `scenarios` holds the index into `scenario_names` per row (or the names themselves). With
  `truth` (the true click probability, known for synthetic data) every block also gets
  `bayes_auc`, the AUC of the truth: the ceiling any model can reach on those rows.
  """
  y = _as_labels(labels)
  p = _as_float(probs)
  g = None if groups is None else np.asarray(groups).reshape(-1)
  t = None if truth is None else _as_float(truth)

  def block(mask):
    gm = None if g is None else (g if mask is None else g[mask])
    if mask is None:
      m = compute_metrics(y, p, gm, threshold)
      if t is not None:
        m["bayes_auc"] = auc(y, t)
      return m
    m = compute_metrics(y[mask], p[mask], gm, threshold)
    if t is not None:
      m["bayes_auc"] = auc(y[mask], t[mask])
    return m

  return {
      "overall": block(None),
      "scenarios": {name: block(mask) for name, mask in _scenario_masks(scenarios,
                                                                        scenario_names)},
  }


def roc_curves(labels, probs, scenarios=None, scenario_names: Sequence[str] = (),
               max_points: int = 200) -> Mapping[str, tuple[np.ndarray, np.ndarray]]:
  """`{name: (fpr, tpr)}` for 'overall' and each scenario, ready for `plots.plot_roc`."""
  y = _as_labels(labels)
  p = _as_float(probs)
  curves = {"overall": roc_curve(y, p, max_points)[:2]}
  if scenarios is not None:
    for name, mask in _scenario_masks(scenarios, scenario_names):
      fpr, tpr, _ = roc_curve(y[mask], p[mask], max_points)
      if fpr.size:
        curves[name] = (fpr, tpr)
  return curves
