"""benchmarks/scaling.py --small: the command runs end to end and writes a sane JSON, table and
plot; on a world small enough to learn, 10x more rows must close much of the gap to the
Bayes-optimal AUC (a model or recipe that stops learning from data fails here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "scaling.py")


def test_scaling_small(tmp_path):
  out = tmp_path / "scaling"
  env = dict(os.environ, MSCENARIO_CACHE=str(tmp_path / "cache"))
  done = subprocess.run([sys.executable, SCRIPT, "--small", "--quiet", "--out", str(out)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]

  report = json.loads((out / "scaling.json").read_text())
  points = sorted(report["points"], key=lambda p: p["rows"])
  assert [p["rows"] for p in points] == [4_000, 40_000]
  for p in points:
    assert 0.5 < p["test_auc"] < 1.0 and 0.5 < p["bayes_auc"] < 1.0, p
    assert abs(p["gap"] - (p["bayes_auc"] - p["test_auc"])) < 1e-12
    assert p["examples_per_sec"] > 0 and p["wall_s"] > 0 and p["parameters"] > 0
    assert os.path.exists(os.path.join(p["workdir"], "results.json"))
    # The reference learner is told the item side: it must beat the model that learns it.
    assert 0.0 < p["oracle_gap"] < p["gap"], p
  small, large = points
  # The same world's test split grows with the rows: the ceiling barely moves, the gap must
  # shrink by a wide margin (measured: 0.118 -> 0.063, test AUC 0.702 -> 0.775).
  assert abs(small["bayes_auc"] - large["bayes_auc"]) < 0.03
  assert large["gap"] < 0.75 * small["gap"], points
  assert large["test_auc"] > small["test_auc"] + 0.03, points

  table = (out / "scaling.md").read_text()
  assert "| rows | width |" in table and "user-oracle gap" in table
  assert "40,000" in table and f"{large['gap']:.4f}" in table
  png = (out / "scaling.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
