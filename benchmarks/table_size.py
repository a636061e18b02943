"""Step time and memory against embedding-table size (sparse vs dense updates).

  python benchmarks/table_size.py --rows 100000,1000000,10000000,100000000 --update rowwise_adagrad
  python benchmarks/table_size.py --rows 100000,1000000,10000000 --update dense

Each size runs in its own process (peak RSS is per process). The model is STAR at batch 4096
with 6 sparse features (one of them spans the big id space), embed dim 16, fp32; ids are drawn
Zipf-like, as real traffic is. Prints step time, examples/s, bytes per row of table+optimizer
state, and peak resident memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(rows: int, update: str, steps: int, batch: int, model: str) -> dict:
  import jax
  from mscenario.config import base_config
  from mscenario.data.prepare import PreparedData
  from mscenario.data.schema import FeatureSchema, SparseFeature
  from mscenario.data.transform import Transform
  from mscenario.data import pipeline
  from mscenario.parallel import mesh as mesh_lib
  from mscenario.train import loop

  small = [SparseFeature(n, v) for n, v in (("user", 6042), ("gender", 4), ("occupation", 23),
                                            ("zip", 3441), ("genre", 20))]
  schema = FeatureSchema(sparse=(SparseFeature("item", rows), *small), multi=(),
                         dense=("age",), scenario_names=("a", "b", "c"))
  n = batch * 8
  rng = np.random.default_rng(0)
  item = np.minimum(rng.zipf(1.2, n), rows - 1).astype(np.int32)
  other = [rng.integers(2, f.vocab_size, n).astype(np.int32) for f in small]
  arrays = {"sparse": np.stack([item, *other], 1), "multi": np.zeros((n, 0, 0), np.int32),
            "dense": rng.normal(size=(n, 1)).astype(np.float32),
            "scenario": rng.integers(0, 3, n).astype(np.int32),
            "label": rng.integers(0, 2, n).astype(np.float32),
            "item": item}
  data = PreparedData("", arrays, {"train": np.arange(n)},
                      Transform({"schema": schema.to_dict()}), {"fingerprint": ""})
  c = base_config()
  c.model.name = model
  c.train.batch_size = batch
  c.train.embed_update = update
  c.train.embed_learning_rate = 0.01
  t0 = time.perf_counter()
  mesh = mesh_lib.make_mesh(c.mesh)
  setup = loop.build(c, data, mesh)
  state = setup.create_state()
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  it = pipeline.BatchIterator(data, "train", batch, seed=0, shuffle=True, drop_last=True)
  sharding = mesh_lib.batch_sharding(mesh)
  batches = [pipeline.to_global(b, sharding) for b in it.epoch(0)]
  state, m = setup.train_step(state, batches[0])  # compile
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(steps):
    state, m = setup.train_step(state, batches[i % len(batches)])
  jax.block_until_ready((state, m))
  step_s = (time.perf_counter() - t0) / steps
  state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(
      (state.embed, state.opt_state, state.params)))
  return {"rows": rows, "update": update, "step_ms": step_s * 1e3,
          "examples_per_sec": batch / step_s, "init_s": init_s,
          "state_gib": state_bytes / 2**30,
          "bytes_per_row": state_bytes / rows,
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", default="100000,1000000,10000000")
  p.add_argument("--update", default="rowwise_adagrad",
                 help="rowwise_adagrad | lazy_adam | dense")
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--batch", type=int, default=4096)
  p.add_argument("--model", default="star")
  p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.one:
    print("RESULT " + json.dumps(one(args.one, args.update, args.steps, args.batch,
                                     args.model)))
    return
  results = []
  for rows in [int(r) for r in args.rows.split(",")]:
    done = subprocess.run([sys.executable, __file__, "--one", str(rows), "--update",
                           args.update, "--steps", str(args.steps), "--batch",
                           str(args.batch), "--model", args.model], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if not line:
      print(f"rows={rows}: failed\n{done.stderr[-2000:]}")
      continue
    r = json.loads(line[0][7:])
    results.append(r)
    print(f"rows={rows:>11,}  {args.update:16s} step {r['step_ms']:7.1f} ms  "
          f"{r['examples_per_sec']:>9,.0f} ex/s  state {r['state_gib']:6.2f} GiB "
          f"({r['bytes_per_row']:.0f} B/row)  peak RSS {r['peak_rss_gib']:5.2f} GiB  "
          f"init {r['init_s']:.1f}s", flush=True)
  if len(results) > 1:
    base = results[0]
    for r in results[1:]:
      print(f"step time ratio {r['rows']:,} / {base['rows']:,} rows: "
            f"{r['step_ms'] / base['step_ms']:.2f}x")


if __name__ == "__main__":
  main()
