"""Train-step speed of the core models against the machine's FLOP rate.

  python benchmarks/model_speed.py --out /tmp/model_speed.json
  python benchmarks/model_speed.py --baseline HEAD~3 --models mmoe,ple   # old vs new

For sharedbottom, mmoe, ple and star, at the PyTorch reference's layer sizes ('ref') and at
the shipped sizes ('shipped'), builds the real training step (`loop.build` on ML-1M, or the
synthetic config when ../shared is missing), times the jitted step alone on batches already
on device (compile and warm-up excluded), and reads the step's FLOPs from XLA's cost
analysis. The "ceiling" is the measured f32 matmul FLOP/s divided by the step's FLOPs per
example: the examples/s this step would reach if every FLOP ran at matmul speed.

--baseline REV also builds each model from the mscenario/models sources at git revision
REV and times both steps interleaved in this one process (shared cores make separate runs
incomparable); the JSON then has before/after and their ratio.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mscenario.config import load_config  # noqa: E402
from mscenario.data import pipeline  # noqa: E402
from mscenario.data.prepare import prepare  # noqa: E402
from mscenario.models import registry  # noqa: E402
from mscenario.parallel import mesh as mesh_lib  # noqa: E402
from mscenario.train import loop  # noqa: E402

MODELS = ("sharedbottom", "mmoe", "ple", "star")
# The PyTorch reference's layer sizes (Scenario-Wise Rec's ML-1M scripts).
REF_SIZES = {
    "sharedbottom": {"hidden": (128,), "tower_hidden": (8,)},
    "mmoe": {"num_experts": 3, "expert_hidden": (16,), "tower_hidden": (8,)},
    "ple": {"shared_experts": 1, "specific_experts": 2, "expert_hidden": (16,),
            "tower_hidden": (8,)},
    "star": {"hidden": (128, 64, 32), "aux_hidden": (32,)},
}
ML1M = os.path.join(REPO, "..", "shared", "data", "movielens", "ml-1m")


def matmul_flops(n: int = 2048, reps: int = 5) -> float:
  """Best-of f32 [n, n] @ [n, n] FLOP/s: the machine's practical dense ceiling."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def load_baseline(rev: str) -> dict:
  """Model classes from mscenario/models at git revision `rev`, as a private package
  (registered under no name; `layers` is the revision's own)."""
  tmp = tempfile.mkdtemp(prefix="baseline_models_")
  pkg = os.path.join(tmp, "_baseline_models")
  os.makedirs(pkg)
  open(os.path.join(pkg, "__init__.py"), "w").close()
  names = ("layers",) + MODELS
  for name in names:
    src = subprocess.run(["git", "show", f"{rev}:mscenario/models/{name}.py"], cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    src = src.replace("from mscenario.models.layers import",
                      "from _baseline_models.layers import")
    src = src.replace("from mscenario.models.registry import register",
                      "register = lambda name: (lambda cls: cls)")
    with open(os.path.join(pkg, f"{name}.py"), "w") as f:
      f.write(src)
  sys.path.insert(0, tmp)
  out = {}
  for name in MODELS:
    spec = importlib.util.spec_from_file_location(f"_baseline_models.{name}",
                                                  os.path.join(pkg, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    cls = [v for v in vars(mod).values() if isinstance(v, type) and
           getattr(v, "__module__", "") == spec.name and hasattr(v, "num_scenarios")]
    out[name] = cls[0]
  return out


def build_step(config, data, mesh, model_cls=None):
  """(train_step, state) for `config`; `model_cls` replaces the registered class."""
  name = config.model.name
  saved = registry._MODELS.get(name)
  if model_cls is not None:
    saved = registry._MODELS[name]
    registry._MODELS[name] = model_cls
  try:
    setup = loop.build(config, data, mesh)
  finally:
    if model_cls is not None:
      registry._MODELS[name] = saved
  return setup.train_step, setup.create_state()


def time_steps(step, state, batches, steps):
  t0 = time.perf_counter()
  for b in itertools.islice(itertools.cycle(batches), steps):
    state, m = step(state, b)
  jax.block_until_ready((state, m))
  return state, time.perf_counter() - t0


def step_flops(step, state, batch) -> float:
  cost = step.lower(state, batch).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="")
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--sizes", default="ref,shipped")
  p.add_argument("--steps", type=int, default=8, help="steps per timed repetition")
  p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median)")
  p.add_argument("--batches", type=int, default=8, help="distinct staged batches")
  p.add_argument("--baseline", default="", help="git revision of the old models to compare")
  p.add_argument("overrides", nargs="*")
  args = p.parse_args()

  baseline = load_baseline(args.baseline) if args.baseline else {}
  peak = matmul_flops()
  use_ml1m = os.path.isdir(ML1M)
  print(f"{jax.device_count()} {jax.default_backend()} device(s); f32 matmul "
        f"{peak / 1e9:.1f} GFLOP/s; data {'ML-1M' if use_ml1m else 'synthetic'}")
  results = {"matmul_flops_per_s": peak, "data": "ml-1m" if use_ml1m else "synthetic",
             "backend": jax.default_backend(), "baseline": args.baseline, "runs": []}
  data_cache = {}
  for name in args.models.split(","):
    for size in args.sizes.split(","):
      sizes = REF_SIZES[name] if size == "ref" else {}
      if use_ml1m:
        cfg_path = os.path.join(REPO, "configs", f"ml1m_{name}.py")
        overrides = [f"--config.data.root={ML1M}"]
      else:
        cfg_path = os.path.join(REPO, "configs", "synthetic.py")
        overrides = [f"--config.model.name={name}", "--config.train.batch_size=4096"]
      overrides += [f"--config.model.{name}.{k}={v}" for k, v in sizes.items()] + args.overrides
      config = load_config(cfg_path, overrides)
      key = (cfg_path if not use_ml1m else "ml1m")
      if key not in data_cache:
        data_cache[key] = prepare(config)
      data = data_cache[key]
      mesh = mesh_lib.make_mesh(config.mesh)
      bs = config.train.batch_size
      it = pipeline.BatchIterator(data, "train", bs, seed=0, shuffle=True, drop_last=True)
      sharding = mesh_lib.batch_sharding(mesh)
      batches = [pipeline.to_global(b, sharding)
                 for b in itertools.islice(it.epoch(0), args.batches)]

      impls = {"after": build_step(config, data, mesh)}
      if name in baseline:
        impls["before"] = build_step(config, data, mesh, baseline[name])
      flops, states, times = {}, {}, {k: [] for k in impls}
      for k, (step, state) in impls.items():
        flops[k] = step_flops(step, state, batches[0])
        state, _ = time_steps(step, state, batches, 2)  # compile + warm-up
        states[k] = state
      for _ in range(args.reps):
        for k, (step, _) in impls.items():
          states[k], dt = time_steps(step, states[k], batches, args.steps)
          times[k].append(args.steps * bs / dt)
      run = {"model": name, "size": size, "batch_size": bs, "layer_overrides": sizes}
      for k in impls:
        eps = statistics.median(times[k])
        per_ex = flops[k] / bs
        run[k] = {"examples_per_s": eps, "all_examples_per_s": times[k],
                  "step_flops": flops[k], "flops_per_example": per_ex,
                  "achieved_flops_per_s": eps * per_ex, "ceiling_examples_per_s": peak / per_ex}
      line = f"{name:>12} {size:>7}"
      for k in ("before", "after"):
        if k in run:
          r = run[k]
          line += (f" | {k} {r['examples_per_s']:>9,.0f} ex/s {r['step_flops'] / 1e9:6.2f} "
                   f"GFLOP/step {r['achieved_flops_per_s'] / 1e9:5.1f} GFLOP/s "
                   f"ceiling {r['ceiling_examples_per_s']:>10,.0f}")
      if "before" in run:
        run["ratio"] = run["after"]["examples_per_s"] / run["before"]["examples_per_s"]
        per_rep = [a / b for a, b in zip(times["after"], times["before"])]
        run["ratio_median_of_pairs"] = statistics.median(per_rep)
        line += f" | x{run['ratio']:.2f} (pairs x{run['ratio_median_of_pairs']:.2f})"
      print(line, flush=True)
      results["runs"].append(run)
      del impls, states
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
  main()
