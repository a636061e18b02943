"""Explanations: why a scenario scores a row as it does (`mscenario explain`).

  groups.py     which model inputs make up each explained feature
  baseline.py   the integrated-gradients baseline (frequency-weighted mean embeddings)
  integrated.py integrated gradients, batched and jitted
  attribute.py  attributions for many rows (chunks, progress, completeness tolerance)
  internals.py  MMoE/PLE gate use per scenario, STAR shared vs scenario-specific, PEPNet /
                AdaSparse gates per feature and layer, M2M's scenario-generated weights
  summary.py    per-scenario tables, scenario similarity, rank correlation
  plots.py      heatmap PNGs
  report.py     explain.json, attributions.csv and the PNGs
  run.py        a work dir -> outputs; the CLI command
  serving.py    the explanation function an export carries (POST /v1/explain)
"""
