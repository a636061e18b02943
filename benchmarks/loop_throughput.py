"""Training-loop throughput, input included: host pipeline vs device-resident scanned calls.

  python benchmarks/loop_throughput.py --root ../shared/data/movielens/ml-1m \
      --models sharedbottom,mmoe,ple,star --sizes reference,shipped --out runs/loop.json

For each model and layer-size set, both batch sources of `mscenario.train.fit` run the same
compiled step on ML-1M (Scenario-Wise Rec protocol, batch 4096) in one process, interleaved
(`--repeats` windows of `--steps` steps each, after a warm-up window that compiles), and the
median examples/s of each is printed with their ratio and the PyTorch reference's figure
(Scenario-Wise Rec, measured on this kind of 2-core CPU, issue 11).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mscenario.config import load_config  # noqa: E402
from mscenario.data import pipeline  # noqa: E402
from mscenario.data.prepare import prepare  # noqa: E402
from mscenario.parallel import mesh as mesh_lib  # noqa: E402
from mscenario.train import fit as fit_lib  # noqa: E402
from mscenario.train import loop  # noqa: E402

# The reference implementation's own layer sizes (DESIGN.md §4).
REFERENCE_SIZES = {
    "sharedbottom": ["--config.model.sharedbottom.hidden=(128,)",
                     "--config.model.sharedbottom.tower_hidden=(8,)"],
    "mmoe": ["--config.model.mmoe.num_experts=3", "--config.model.mmoe.expert_hidden=(16,)",
             "--config.model.mmoe.tower_hidden=(8,)"],
    "ple": ["--config.model.ple.shared_experts=1", "--config.model.ple.specific_experts=2",
            "--config.model.ple.expert_hidden=(16,)", "--config.model.ple.tower_hidden=(8,)"],
    "star": ["--config.model.star.hidden=(128,64,32)", "--config.model.star.aux_hidden=(32,)"],
}
REFERENCE_EPS = {"sharedbottom": 36_200, "mmoe": 32_500, "ple": 27_800, "star": 25_900}


def window(source, state, epoch: int, start: int, steps: int):
  """`steps` steps from batch `start`; returns (state, seconds)."""
  source.start_epoch(epoch, start)
  t0 = time.perf_counter()
  done = 0
  while done < steps:
    n = min(source.max_steps_per_call, steps - done)
    state, metrics = source.advance(state, n)
    done += n
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - t0
  source.end_epoch()
  return state, seconds


def measure(config, data, steps: int, repeats: int, steps_per_call: int,
            host: bool = True) -> dict:
  """Median examples/s of each source (host: also the host pipeline)."""
  mesh = mesh_lib.make_mesh(config.mesh)
  setup = loop.build(config, data, mesh)
  bs = config.train.batch_size
  it = pipeline.BatchIterator(data, "train", bs, seed=config.seed, shuffle=True,
                              drop_last=True)
  steps = min(steps, it.num_batches)
  sources = {"device": fit_lib.DeviceBatches(setup, it, steps_per_call)}
  if host:
    sources["host"] = fit_lib.HostBatches(setup, it, config.train.prefetch)
  states = {name: setup.create_state() for name in sources}
  times = {name: [] for name in sources}
  for r in range(repeats + 1):  # window 0 compiles
    for name, source in sources.items():
      start = (r * steps) % max(1, it.num_batches - steps)
      states[name], sec = window(source, states[name], r, start, steps)
      if r:
        times[name].append(sec)
  eps = {name: steps * bs / statistics.median(t) for name, t in times.items()}
  out = {"device_eps": eps["device"], "steps": steps, "repeats": repeats, "batch_size": bs}
  if host:
    out.update(host_eps=eps["host"], device_over_host=eps["device"] / eps["host"])
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--root", default="../shared/data/movielens/ml-1m")
  p.add_argument("--models", default="sharedbottom,mmoe,ple,star")
  p.add_argument("--sizes", default="reference,shipped")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--steps-per-call", type=int, default=32)
  p.add_argument("--out", default="")
  p.add_argument("overrides", nargs="*")
  args = p.parse_args()
  rows = []
  data = None
  for model in args.models.split(","):
    for size in args.sizes.split(","):
      extra = REFERENCE_SIZES[model] if size == "reference" else []
      config = load_config(f"configs/ml1m_{model}.py",
                           [f"--config.data.root={args.root}", *extra, *args.overrides])
      if data is None:  # the same prepared data for every model (same data config)
        data = prepare(config, log=lambda *_: None)
      res = {"model": model, "size": size,
             **measure(config, data, args.steps, args.repeats, args.steps_per_call)}
      res["reference_eps"] = REFERENCE_EPS[model]
      res["device_over_reference"] = res["device_eps"] / REFERENCE_EPS[model]
      rows.append(res)
      print(f"{model:>12} {size:>9}: host {res['host_eps']:>10,.0f}  device "
            f"{res['device_eps']:>10,.0f} ex/s  (device/host {res['device_over_host']:.2f}x, "
            f"vs reference {res['device_over_reference']:.1f}x)", flush=True)
  print("\n| model | sizes | host pipeline ex/s | device-resident ex/s | device/host | "
        "reference ex/s | device/reference |\n|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['size']} | {r['host_eps']:,.0f} | {r['device_eps']:,.0f} | "
          f"{r['device_over_host']:.2f}x | {r['reference_eps']:,} | "
          f"{r['device_over_reference']:.1f}x |")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"rows": rows, "devices": jax.device_count(),
                 "backend": jax.default_backend()}, f, indent=2)


if __name__ == "__main__":
  main()
