"""A seed sweep as one vectorised program vs the same runs one after another, side by side.

  python benchmarks/sweep_speed.py --models sharedbottom,star --seeds 2022,2023,2024 \
      --root ../shared/data/movielens/ml-1m --out runs/sweep_speed

For each model: (a) `mscenario train --config.sweep.seed=...` once (all replicas as one vmapped
program), (b) `mscenario train --config.seed=s` for each seed in turn — both as a user runs
them, fresh processes from start-up to the final report, with the prepared-data cache warm
(prepared once before timing). Prints wall times, the ratio, and each seed's test AUC from
both (they agree to rounding; tests/test_sweep.py), and writes a JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(config: str, workdir: str, overrides: list[str]) -> float:
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "mscenario", "train", "--config", config, "--workdir", workdir,
         *overrides]
  print("$", " ".join(cmd), flush=True)
  t0 = time.perf_counter()
  done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True)
  if done.returncode != 0:
    raise SystemExit(f"run failed ({workdir}):\n{done.stderr[-3000:]}")
  return time.perf_counter() - t0


def auc(workdir: str) -> float:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)["overall"]["auc"]


def step_costs(config_path: str, overrides: list[str], replicas: int, steps: int = 8,
               reps: int = 5) -> dict:
  """Examples/s of R single jitted steps vs one vmapped step of R replicas, on the same
  staged batches, interleaved in this process (shared cores make separate runs
  incomparable): does the replica axis make each example cheaper?"""
  import itertools
  import statistics

  import jax
  import jax.numpy as jnp

  sys.path.insert(0, REPO)
  from mscenario.config import load_config
  from mscenario.data import pipeline
  from mscenario.data.prepare import prepare
  from mscenario.parallel import mesh as mesh_lib
  from mscenario.train import state as state_lib

  config = load_config(config_path, overrides)
  mesh = mesh_lib.make_mesh(config.mesh)
  data = prepare(config, log=lambda *_: None)
  setup = state_lib.build(config, data, mesh)
  it = pipeline.BatchIterator(data, "train", config.train.batch_size, seed=0, shuffle=True,
                              drop_last=True)
  batches = [pipeline.to_global(b, mesh_lib.batch_sharding(mesh))
             for b in itertools.islice(it.epoch(0), 4)]
  single = jax.jit(setup.step_fn, donate_argnums=0)
  many = jax.jit(jax.vmap(setup.step_fn), donate_argnums=0)
  mapped = jax.jit(lambda st, b: jax.lax.map(lambda a: setup.step_fn(*a), (st, b)),
                   donate_argnums=0)
  stack = lambda x: jnp.stack([x] * replicas)  # noqa: E731
  states = [setup.create_state() for _ in range(replicas)]
  stacked = jax.tree_util.tree_map(stack, setup.create_state())
  stacked_batches = [jax.tree_util.tree_map(stack, b) for b in batches]

  def run_single(states):
    for b in itertools.islice(itertools.cycle(batches), steps):
      states = [single(s, b)[0] for s in states]
    return states

  def run_many(stacked, fn):
    for b in itertools.islice(itertools.cycle(stacked_batches), steps):
      stacked = fn(stacked, b)[0]
    return stacked

  states, stacked = run_single(states), run_many(stacked, many)  # compile and warm up
  stacked = run_many(stacked, mapped)
  jax.block_until_ready((states, stacked))
  times = {"single": [], "vmapped": [], "mapped": []}
  for _ in range(reps):
    t0 = time.perf_counter()
    states = jax.block_until_ready(run_single(states))
    times["single"].append(time.perf_counter() - t0)
    for name, fn in (("vmapped", many), ("mapped", mapped)):
      t0 = time.perf_counter()
      stacked = jax.block_until_ready(run_many(stacked, fn))
      times[name].append(time.perf_counter() - t0)
  n = replicas * steps * config.train.batch_size
  out = {k: n / statistics.median(v) for k, v in times.items()}
  out["vmapped_over_single"] = out["vmapped"] / out["single"]
  out["mapped_over_single"] = out["mapped"] / out["single"]
  return out


def program_costs(config_path: str, overrides: list[str], seeds: list[int], calls: int = 3,
                  reps: int = 3) -> dict:
  """Training examples/s of the real programs, interleaved in this process: each seed's own
  device-resident scanned program (DeviceBatches) one after another, vs the sweep's program
  over all seeds with the replica axis as vmap and as lax.map (SweepBatches)."""
  import statistics
  import tempfile

  import jax

  sys.path.insert(0, REPO)
  from mscenario.config import load_config
  from mscenario.train import fit as fit_lib
  from mscenario.train import sweep as sweep_lib

  quiet = lambda *_: None  # noqa: E731
  tmp = tempfile.mkdtemp(prefix="sweep_speed_")
  sweeps = {}
  for mode in ("vmap", "map"):
    config = load_config(config_path, [*overrides, f"--config.sweep.seed={','.join(map(str, seeds))}",
                                       f"--config.sweep.vectorize={mode}"])
    sweeps[mode] = sweep_lib.open_sweep(config, os.path.join(tmp, mode), log=quiet)
  runs = sweeps["vmap"].runs
  singles = [fit_lib.make_source(r.setup, r.train_it) for r in runs]
  states = [r.state for r in runs]
  for src in singles:
    src.start_epoch(0, 0)
  for parts in sweeps.values():
    parts.source.start_epoch(0, 0)
  n = singles[0].max_steps_per_call
  batch = singles[0].global_batch_size

  def run_singles():
    for i, src in enumerate(singles):
      src._pos = 0
      for _ in range(calls):
        states[i] = src.advance(states[i], n)[0]
        src._pos = 0
    jax.block_until_ready(states)

  def run_sweep(mode):
    parts = sweeps[mode]
    for _ in range(calls):
      parts.source._pos = 0
      parts.stacked = parts.source.advance(parts.stacked, n)[0]
    jax.block_until_ready(parts.stacked)

  run_singles(), run_sweep("vmap"), run_sweep("map")  # compile
  times = {"separate": [], "vmap": [], "map": []}
  for _ in range(reps):
    for name, fn in (("separate", run_singles), ("vmap", lambda: run_sweep("vmap")),
                     ("map", lambda: run_sweep("map"))):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  total = len(seeds) * calls * n * batch
  out = {k: total / statistics.median(v) for k, v in times.items()}
  out["vmap_over_separate"] = out["vmap"] / out["separate"]
  out["map_over_separate"] = out["map"] / out["separate"]
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="ml1m")
  p.add_argument("--models", default="sharedbottom,mmoe,ple,star")
  p.add_argument("--seeds", default="2022,2023,2024")
  p.add_argument("--root", default="")
  p.add_argument("--out", default="runs/sweep_speed")
  p.add_argument("--step-only", action="store_true",
                 help="only the step-level comparison (R single steps vs one vmapped step)")
  p.add_argument("--program", action="store_true",
                 help="only the training programs, interleaved: separate vs vmap vs map")
  p.add_argument("extra", nargs="*", help="extra --config.x=y overrides (after --)")
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  base = [*([f"--config.data.root={args.root}"] if args.root else []), *args.extra]
  if args.program:
    for model in args.models.split(","):
      config = os.path.join(REPO, "configs", f"{args.dataset}_{model}.py")
      got = program_costs(config, base, seeds)
      print(f"| {model} | {got['separate']:,.0f} | {got['vmap']:,.0f} | "
            f"{got['vmap_over_separate']:.2f} | {got['map']:,.0f} | "
            f"{got['map_over_separate']:.2f} |", flush=True)
    return
  if args.step_only:
    for model in args.models.split(","):
      config = os.path.join(REPO, "configs", f"{args.dataset}_{model}.py")
      got = step_costs(config, base, len(seeds))
      print(f"| {model} | {got['single']:,.0f} | {got['vmapped']:,.0f} | "
            f"{got['vmapped_over_single']:.2f} | {got['mapped']:,.0f} | "
            f"{got['mapped_over_single']:.2f} |", flush=True)
    return
  report = {"seeds": seeds, "load_average_start": os.getloadavg(), "models": {}}
  rows = []
  for model in args.models.split(","):
    config = os.path.join(REPO, "configs", f"{args.dataset}_{model}.py")
    out = os.path.join(args.out, model)
    for s in seeds:  # prepare (and cache) every seed's split before timing anything
      subprocess.run([sys.executable, "-m", "mscenario", "data", "prepare", "--config", config,
                      f"--config.seed={s}", *base], cwd=REPO, check=True,
                     stdout=subprocess.DEVNULL)
    swept = train(config, os.path.join(out, "sweep"),
                  [f"--config.sweep.seed={','.join(map(str, seeds))}", *base])
    alone = [train(config, os.path.join(out, f"alone{s}"), [f"--config.seed={s}", *base])
             for s in seeds]
    aucs_sweep = [auc(os.path.join(out, "sweep", f"seed={s}")) for s in seeds]
    aucs_alone = [auc(os.path.join(out, f"alone{s}")) for s in seeds]
    entry = {"sweep_s": swept, "sequential_s": sum(alone), "runs_s": alone,
             "ratio": swept / sum(alone), "auc_sweep": aucs_sweep, "auc_alone": aucs_alone,
             "max_auc_difference": max(abs(a - b) for a, b in zip(aucs_sweep, aucs_alone))}
    report["models"][model] = entry
    rows.append(f"| {model} | {sum(alone):.0f} | {swept:.0f} | {entry['ratio']:.2f} | "
                f"{entry['max_auc_difference']:.1e} |")
    print(rows[-1], flush=True)
  report["load_average_end"] = os.getloadavg()
  table = "\n".join(["| model | 3 sequential runs s | one sweep s | sweep / sequential | "
                     "max test-AUC difference |", "|---|---|---|---|---|", *rows])
  print(table)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "sweep_speed.json"), "w") as f:
    json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
