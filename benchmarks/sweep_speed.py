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


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="ml1m")
  p.add_argument("--models", default="sharedbottom,mmoe,ple,star")
  p.add_argument("--seeds", default="2022,2023,2024")
  p.add_argument("--root", default="")
  p.add_argument("--out", default="runs/sweep_speed")
  p.add_argument("extra", nargs="*", help="extra --config.x=y overrides (after --)")
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  base = [*([f"--config.data.root={args.root}"] if args.root else []), *args.extra]
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
