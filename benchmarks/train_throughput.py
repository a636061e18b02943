"""Train-step throughput vs input-pipeline throughput on a prepared data set.

  python benchmarks/train_throughput.py --config configs/ml1m_star.py \
      --root ../shared/data/movielens/ml-1m --steps 100

Measures (1) the jitted train step alone on batches already on device, (2) the input
pipeline alone (numpy batches + device transfer), (3) both together as the training loop runs
them (prefetch thread), and prints examples/s and the pipeline/step ratio (target >= 5x).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mscenario.config import load_config  # noqa: E402
from mscenario.data import pipeline  # noqa: E402
from mscenario.data.prepare import prepare  # noqa: E402
from mscenario.parallel import mesh as mesh_lib  # noqa: E402
from mscenario.train import loop  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/ml1m_star.py")
  p.add_argument("--root", default="")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("overrides", nargs="*")
  args = p.parse_args()
  overrides = [*([f"--config.data.root={args.root}"] if args.root else []), *args.overrides]
  config = load_config(args.config, overrides)
  data = prepare(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  setup = loop.build(config, data, mesh)
  state = setup.create_state()
  bs = config.train.batch_size
  it = pipeline.BatchIterator(data, "train", bs, seed=0, shuffle=True, drop_last=True)
  sharding = mesh_lib.batch_sharding(mesh)
  n = min(args.steps, it.num_batches)

  # (1) step alone, batches pre-staged on device.
  staged = [pipeline.to_global(b, sharding) for b in itertools.islice(it.epoch(0), n)]
  state, m = setup.train_step(state, staged[0])
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for b in staged:
    state, m = setup.train_step(state, b)
  jax.block_until_ready((state, m))
  step_eps = n * bs / (time.perf_counter() - t0)

  # (2) input pipeline alone (numpy gather + device transfer).
  t0 = time.perf_counter()
  for b in itertools.islice(it.epoch(1), n):
    jax.block_until_ready(pipeline.to_global(b, sharding))
  input_eps = n * bs / (time.perf_counter() - t0)

  # (3) the loop's combination: prefetch thread + step.
  t0 = time.perf_counter()
  for b in pipeline.prefetch(itertools.islice(it.epoch(2), n),
                             lambda b: pipeline.to_global(b, sharding), 2):
    state, m = setup.train_step(state, b)
  jax.block_until_ready((state, m))
  loop_eps = n * bs / (time.perf_counter() - t0)

  print(f"model {config.model.name}, batch {bs}, {n} steps, {jax.device_count()} "
        f"{jax.default_backend()} device(s), embed_update={config.train.embed_update}")
  print(f"  train step alone      {step_eps:>12,.0f} examples/s  "
        f"({1e3 * bs / step_eps:.1f} ms/step)")
  print(f"  input pipeline alone  {input_eps:>12,.0f} examples/s  "
        f"(ratio to step: {input_eps / step_eps:.1f}x)")
  print(f"  training loop         {loop_eps:>12,.0f} examples/s")


if __name__ == "__main__":
  main()
