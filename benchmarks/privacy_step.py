"""Cost of the DP-SGD step: the non-private step, the private step with per-unit gradients
materialised by `jax.vmap` (privacy.clipping=vmap, the reference) and the two-pass private
step (privacy.clipping=ghost, the default), side by side in one process.

  python benchmarks/privacy_step.py --models mmoe,star --sizes ref,shipped

Each model is built by `loop.build` from configs/ml1m_<model>.py (the synthetic config when
../shared is missing) with model.batch_norm=false (BatchNorm is refused under DP) and
privacy at epsilon 8; the jitted steps are timed alone on batches already on the device
(compile and warm-up excluded), interleaved over --reps repetitions, median reported.
The non-private step is the model as users train it without privacy (STAR: the grouped
scenario matmul; DP needs model.star.scenario_matmul=dense).
Rates are physical rows per second (a private batch's padding rows cost the same compute).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mscenario.config import load_config  # noqa: E402
from mscenario.data import pipeline  # noqa: E402
from mscenario.data.prepare import prepare  # noqa: E402
from mscenario.parallel import mesh as mesh_lib  # noqa: E402
from mscenario.train import loop, privacy  # noqa: E402

from benchmarks.model_speed import ML1M, REF_SIZES, time_steps  # noqa: E402

IMPLS = ("non-private", "vmap", "ghost")


def build(name, size, batch_size, impl, extra, data_cache):
  sizes = REF_SIZES[name] if size == "ref" else {}
  if os.path.isdir(ML1M):
    cfg_path, over = os.path.join(REPO, "configs", f"ml1m_{name}.py"), [
        f"--config.data.root={ML1M}"]
  else:
    cfg_path, over = os.path.join(REPO, "configs", "synthetic.py"), [
        f"--config.model.name={name}"]
  over += [f"--config.model.{name}.{k}={v}" for k, v in sizes.items()]
  over += ["--config.model.batch_norm=false", f"--config.train.batch_size={batch_size}"]
  if impl != "non-private":
    over += ["--config.privacy.enabled=true", "--config.privacy.epsilon=8",
             f"--config.privacy.clipping={impl}"]
    if name == "star":  # DP needs STAR's dense scenario matmul; non-private keeps 'grouped'
      over.append("--config.model.star.scenario_matmul=dense")
  config = load_config(cfg_path, over + extra)
  if cfg_path not in data_cache:
    data_cache[cfg_path] = prepare(config, log=lambda *_: None)
  data = data_cache[cfg_path]
  mesh = mesh_lib.make_mesh(config.mesh)
  setup = loop.build(config, data, mesh)
  if setup.privacy:
    it = privacy.PoissonBatches(setup.privacy, data, seed=0)
  else:
    it = pipeline.BatchIterator(data, "train", batch_size, seed=0, shuffle=True,
                                drop_last=True)
  sharding = mesh_lib.batch_sharding(mesh)
  batches = [pipeline.to_global(b, sharding) for b in itertools.islice(it.epoch(0), 3)]
  return setup.train_step, setup.create_state(), batches


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="mmoe,star")
  p.add_argument("--sizes", default="ref,shipped")
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--batch-size", type=int, default=16384)
  p.add_argument("--steps", type=int, default=2, help="steps per timed repetition")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--out", default="")
  p.add_argument("overrides", nargs="*", help="more --config overrides for every step")
  a = p.parse_args()
  print(f"{jax.device_count()} {jax.default_backend()} device(s); batch {a.batch_size}; "
        f"data {'ML-1M' if os.path.isdir(ML1M) else 'synthetic'}", flush=True)
  data_cache, results = {}, []
  for name in a.models.split(","):
    for size in a.sizes.split(","):
      impls = {k: build(name, size, a.batch_size, k, a.overrides, data_cache)
               for k in a.impls.split(",")}
      states, rates = {}, {k: [] for k in impls}
      for k, (step, state, batches) in impls.items():
        states[k], _ = time_steps(step, state, batches, 1)  # compile + warm-up
      for _ in range(a.reps):
        for k, (step, _, batches) in impls.items():
          states[k], dt = time_steps(step, states[k], batches, a.steps)
          rates[k].append(a.steps * a.batch_size / dt)
      row = {"model": name, "size": size, "batch_size": a.batch_size,
             **{k: statistics.median(v) for k, v in rates.items()}}
      line = f"{name:>12} {size:>7}"
      for k in impls:
        line += f" | {k} {row[k]:>9,.0f} rows/s"
      if "non-private" in row:
        for k in ("vmap", "ghost"):
          if k in row:
            row[f"{k}_slowdown"] = row["non-private"] / row[k]
            line += f" | {k} {row[f'{k}_slowdown']:.1f}x slower"
      if "vmap" in row and "ghost" in row:
        row["ghost_speedup"] = row["ghost"] / row["vmap"]
        line += f" | ghost/vmap {row['ghost_speedup']:.2f}x"
      print(line, flush=True)
      results.append(row)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
