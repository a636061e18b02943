"""benchmarks/accelerator.py runs unchanged on CPU with --small (what the lent accelerator
runs at full size) and writes its JSON and table."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO


def test_accelerator_benchmark_small_on_cpu(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", MSCENARIO_CACHE=str(tmp_path / "cache"))
  done = subprocess.run([sys.executable, "benchmarks/accelerator.py", "--small", "--out",
                         str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.load(open(tmp_path / "out" / "accelerator.json"))
  assert {(r["model"], r["dtype"]) for r in report["training"]} == {
      ("star", "float32"), ("star", "bfloat16"), ("mmoe", "float32"), ("mmoe", "bfloat16")}
  assert all(r["device_eps"] > 0 for r in report["training"])
  assert any(r.get("host_eps", 0) > 0 for r in report["training"])
  assert report["sparse_step"]["examples_per_sec"] > 0
  assert report["scoring"]["predictions_per_sec"] > 0
  assert "| star | float32 | 512 |" in open(tmp_path / "out" / "accelerator.md").read()
