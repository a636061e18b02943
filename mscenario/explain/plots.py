"""Heatmap PNGs (matplotlib object API on the Agg canvas, as metrics/plots.py: no pyplot, no
display, no global backend state)."""
from __future__ import annotations

import numpy as np

from mscenario.metrics.plots import _figure, _save


def heatmap(matrix, rows, cols, path: str, title: str, fmt: str = "{:.2f}",
            cmap: str = "viridis", vmin=None, vmax=None) -> str:
  """One annotated heatmap: `matrix` [len(rows), len(cols)]."""
  m = np.asarray(matrix, np.float64)
  fig = _figure(max(4.0, 0.8 * len(cols) + 2.0), max(2.5, 0.5 * len(rows) + 1.5))
  ax = fig.add_subplot(1, 1, 1)
  im = ax.imshow(m, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
  ax.set_xticks(range(len(cols)))
  ax.set_xticklabels(cols, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels(rows, fontsize=8)
  finite = m[np.isfinite(m)]
  mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
  if m.size <= 400:
    for i in range(m.shape[0]):
      for j in range(m.shape[1]):
        if np.isfinite(m[i, j]):
          ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=7,
                  color="black" if m[i, j] > mid else "white")
  fig.colorbar(im, ax=ax)
  ax.set_title(title, fontsize=9)
  return _save(fig, path)
