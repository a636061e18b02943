"""cf_* scoring speed of a collaborative state, this code against a git revision's, side by
side in one process (shared cores make separate runs incomparable).

  python benchmarks/cf_score_speed.py --state PREPARED_DIR/collaborative.npz --baseline 4978d10

Times a batch of random (user, item) pairs (what `predict` and data preparation do) and
single-user requests of 10 items (what the server does per request), interleaved, and checks
that both versions give the same values and that a row's values do not depend on the rows
scored with it.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mscenario.data import collaborative as current  # noqa: E402


def load_baseline(rev: str):
  src = subprocess.run(["git", "show", f"{rev}:mscenario/data/collaborative.py"], cwd=REPO,
                       check=True, capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(prefix="cf_baseline_"), "cf_baseline.py")
  with open(path, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location("cf_baseline", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["cf_baseline"] = mod
  spec.loader.exec_module(mod)
  return mod


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--state", required=True, help="a collaborative.npz (prepared data or work dir)")
  p.add_argument("--baseline", default="", help="git revision of the code to compare against")
  p.add_argument("--batch", type=int, default=100_000)
  p.add_argument("--requests", type=int, default=300)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  blob = open(args.state, "rb").read()
  impls = {"current": current}
  if args.baseline:
    impls["baseline"] = load_baseline(args.baseline)
  models = {k: mod.CFModel.load(blob) for k, mod in impls.items()}
  for k, m in models.items():  # per-model lookups are built once, at load in the server
    (m.pair_index if hasattr(m, "pair_index") else m.transposed)()
  nu, ni = models["current"].residual.shape
  r = np.random.default_rng(0)
  users, items = r.integers(0, nu + 3, args.batch), r.integers(0, ni + 3, args.batch)
  batch = {k: [] for k in impls}
  outs = {}
  for _ in range(args.repeats):
    for k, mod in impls.items():
      t0 = time.perf_counter()
      outs[k] = mod.score(models[k], users, items)
      batch[k].append(args.batch / (time.perf_counter() - t0))
  request = {k: [] for k in impls}
  for _ in range(args.requests):
    u, it = np.full(10, r.integers(1, nu)), r.integers(1, ni, 10)
    for k, mod in impls.items():
      t0 = time.perf_counter()
      mod.score(models[k], u, it)
      request[k].append(time.perf_counter() - t0)
  for k in impls:
    print(f"{k:>9}: batch {np.median(batch[k]):>9,.0f} rows/s (median of {args.repeats}); "
          f"request 1 user x 10 items median {np.median(request[k]) * 1e3:.2f} ms, "
          f"p99 {np.percentile(request[k], 99) * 1e3:.2f} ms")
  if "baseline" in outs:
    print(f"batch x{np.median(batch['current']) / np.median(batch['baseline']):.2f}, request "
          f"median x{np.median(request['baseline']) / np.median(request['current']):.2f}; "
          f"max |difference| {np.abs(outs['current'] - outs['baseline']).max():.2e}")
  few = current.score(models["current"], users[:7], items[:7])
  assert np.array_equal(outs["current"][:7], few), "a row's values depend on its batch"
  print("a row's values are the same alone and in the batch: ok")


if __name__ == "__main__":
  main()
