"""Real data, end to end: export a trained data.collaborative run, score raw test rows with the
serving code (which computes their cf_* columns from the exported CF state) and compare with
the prepared rows and with `Run.predict`.

  python benchmarks/cf_serve_check.py runs/best100k/ml100k_best_s2022 /tmp/m100k 200
"""
from __future__ import annotations

import sys
import time

import numpy as np

from mscenario import cli
from mscenario.api import Run
from mscenario.data import sources
from mscenario.data.prepare import prepare
from mscenario.serve import predictor as pred_lib


def raw(v):
  """A table value as a client sends it (a multi-valued field read as single-valued: its
  first value)."""
  if isinstance(v, tuple):
    return v[0] if v else None
  return v.item() if hasattr(v, "item") else v


def main(workdir: str, out: str, n: int) -> None:
  run = Run.open(workdir)
  t0 = time.time()
  assert cli.main(["export", "--workdir", workdir, "--out", out, "--buckets", "8"]) == 0
  print(f"export: {time.time() - t0:.1f} s")
  data = prepare(run.config, log=lambda *_: None)
  table = sources.load_source(run.config.data)
  test = np.asarray(data.splits["test"][:n])
  model = pred_lib.load(out)
  print("manifest collaborative:", model.manifest.get("collaborative"))
  sf = run.config.data.scenario.field
  requests = [{"scenario": raw(table.columns[sf][r]),
               "items": [{f: raw(table.columns[f][r]) for f in model.fields
                          if f in table.columns}]} for r in test]
  served = np.concatenate([model.predict(q) for q in requests])
  dense = model.encode([model.parse(q) for q in requests])["dense"]
  predicted = run.predict({k: [raw(v[r]) for r in test] for k, v in table.columns.items()})
  same = np.array_equal(dense, np.asarray(data.arrays["dense"])[test])
  print(f"{len(served)} test rows: served model inputs == prepared rows: {same}; "
        f"max |served - predict| = {float(np.abs(served - predicted).max()):.2g}")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
