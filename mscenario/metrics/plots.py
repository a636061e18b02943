"""PNG plots: ROC curves per scenario and training curves from a run's metrics.jsonl.

Uses matplotlib's object API with the Agg canvas (no pyplot), so plotting never needs a
display, never touches global backend state and is safe from a background thread.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path: str) -> str:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path


def plot_roc(curves: Mapping[str, tuple], path: str, title: str = "ROC") -> str:
  """One ROC line per entry of `curves` ({name: (fpr, tpr)}), with the chance diagonal."""
  fig = _figure(5.5, 5.0)
  ax = fig.add_subplot(1, 1, 1)
  for name, curve in curves.items():
    fpr, tpr = np.asarray(curve[0]), np.asarray(curve[1])
    if fpr.size == 0:
      continue
    area = float((getattr(np, "trapezoid", None) or np.trapz)(tpr, fpr))
    ax.plot(fpr, tpr, lw=1.6 if name == "overall" else 1.1,
            label=f"{name} (AUC≈{area:.3f})")
  ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_title(title)
  ax.legend(loc="lower right", fontsize=8)
  return _save(fig, path)


def read_jsonl(path: str) -> list[dict]:
  """Records of a jsonl file; blank or unparsable lines (a run killed mid-write) are skipped."""
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(rec, dict):
        out.append(rec)
  return out


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
  if window <= 1 or y.size < window:
    return y
  c = np.cumsum(np.insert(y, 0, 0.0))
  head = c[1:window] / np.arange(1, window)
  return np.concatenate((head, (c[window:] - c[:-window]) / window))


def plot_training_curves(metrics_jsonl_path: str, path: str) -> str:
  """Two panels: training loss vs step (raw + moving average) and validation AUC vs step.

  Train lines carry `step` and `loss`; eval lines carry `step` and `valid_auc` (and, if
  logged, `valid_gauc`). Either kind may be absent; the panel then says so.
  """
  recs = read_jsonl(metrics_jsonl_path)
  train = [(r["step"], r["loss"]) for r in recs
           if "step" in r and isinstance(r.get("loss"), (int, float))]
  fig = _figure(10.0, 4.0)
  ax1 = fig.add_subplot(1, 2, 1)
  ax2 = fig.add_subplot(1, 2, 2)
  if train:
    steps, loss = (np.asarray(v, dtype=np.float64) for v in zip(*train))
    ax1.plot(steps, loss, lw=0.6, alpha=0.4, label="loss")
    ax1.plot(steps, _smooth(loss, max(1, len(loss) // 50)), lw=1.5, label="moving average")
    ax1.legend(fontsize=8)
  else:
    ax1.text(0.5, 0.5, "no training records", ha="center", va="center",
             transform=ax1.transAxes)
  ax1.set_xlabel("step")
  ax1.set_ylabel("training loss")
  ax1.set_title("training loss")
  plotted = False
  for key in ("valid_auc", "valid_gauc"):
    pts = [(r.get("step", i), r[key]) for i, r in enumerate(recs)
           if isinstance(r.get(key), (int, float))]
    if pts:
      x, y = (np.asarray(v, dtype=np.float64) for v in zip(*pts))
      ax2.plot(x, y, marker="o", ms=3, label=key)
      plotted = True
  if plotted:
    ax2.legend(fontsize=8)
  else:
    ax2.text(0.5, 0.5, "no evaluation records", ha="center", va="center",
             transform=ax2.transAxes)
  ax2.set_xlabel("step")
  ax2.set_ylabel("AUC")
  ax2.set_title("validation")
  return _save(fig, path)
