"""Per-scenario summaries of attributions and internals, and the rank statistics the
ground-truth check uses."""
from __future__ import annotations

import numpy as np


def per_scenario_mean_abs(attr: np.ndarray, scenario: np.ndarray,
                          num_scenarios: int) -> np.ndarray:
  """[S, G] mean |attribution| of each feature over each scenario's rows (NaN: no rows)."""
  out = np.full((num_scenarios, attr.shape[1]), np.nan)
  for s in range(num_scenarios):
    m = scenario == s
    if m.any():
      out[s] = np.abs(attr[m]).mean(axis=0)
  return out


def per_scenario_mean(values: np.ndarray, scenario: np.ndarray,
                      num_scenarios: int) -> np.ndarray:
  """[S, ...] mean of per-row `values` [N, ...] over each scenario's rows (NaN: no rows)."""
  out = np.full((num_scenarios,) + values.shape[1:], np.nan)
  for s in range(num_scenarios):
    m = scenario == s
    if m.any():
      out[s] = values[m].mean(axis=0)
  return out


def cosine_similarity(profiles: np.ndarray) -> np.ndarray:
  """[S, S] cosine similarity of the rows of `profiles` [S, K] (NaN rows stay NaN)."""
  p = np.asarray(profiles, np.float64)
  norm = np.linalg.norm(p, axis=1, keepdims=True)
  unit = p / np.where(norm > 0, norm, 1.0)
  return unit @ unit.T


def ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, ties given their average rank (as Spearman's rho needs)."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  r = np.empty(len(x))
  r[order] = np.arange(1, len(x) + 1)
  for v in np.unique(x):
    tie = x == v
    r[tie] = r[tie].mean()
  return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's rank correlation (Pearson on average ranks; NaN when either is constant)."""
  ra, rb = ranks(a), ranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
  return float((ra * rb).sum() / denom) if denom > 0 else float("nan")
