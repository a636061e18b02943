"""Plain-text summary of `evaluate_by_scenario` results, printed at the end of a run."""
from __future__ import annotations

import math

_COLUMNS = (  # (header, key, format)
    ("n", "n", "{:d}"),
    ("AUC", "auc", "{:.4f}"),
    ("gAUC", "gauc", "{:.4f}"),
    ("LogLoss", "logloss", "{:.4f}"),
    ("Acc", "accuracy", "{:.4f}"),
    ("Prec", "precision", "{:.4f}"),
    ("Rec", "recall", "{:.4f}"),
    ("F1", "f1", "{:.4f}"),
    ("Bayes AUC", "bayes_auc", "{:.4f}"),
)


def _cell(value, fmt: str) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"  # undefined (e.g. a scenario with one class): say so rather than print nan
  return fmt.format(value)


def format_table(results: dict, title: str | None = None) -> str:
  """Fixed-width table: one row per scenario, then 'overall'.

  The Bayes AUC column appears only when the results carry `bayes_auc` (synthetic data),
  so real-data tables stay narrow.
  """
  rows = list(results.get("scenarios", {}).items())
  overall = results.get("overall")
  blocks = [b for _, b in rows] + ([overall] if overall else [])
  cols = [c for c in _COLUMNS if c[1] != "bayes_auc" or any("bayes_auc" in b for b in blocks)]
  body = [[name] + [_cell(b.get(k), f) for _, k, f in cols] for name, b in rows]
  if overall:
    body.append(["overall"] + [_cell(overall.get(k), f) for _, k, f in cols])
  header = ["scenario"] + [h for h, _, _ in cols]
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

  def line(cells):
    return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                     for i, c in enumerate(cells))

  out = [title] if title else []
  out += [line(header), "-" * len(line(header))]
  out += [line(r) for r in body[:len(rows)]]
  if overall:
    if rows:
      out.append("-" * len(line(header)))
    out.append(line(body[-1]))
  return "\n".join(out)
