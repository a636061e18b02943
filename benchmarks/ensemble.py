"""In-program ensembles (issue 14 §2): R replicas of one model on ONE split, differing only in
their init seed (and batch order), trained as one sweep program; their mean predicted
probability vs a single replica, on the test split.

  python benchmarks/ensemble.py --dataset ml1m --models star,mmoe --split-seed 2022 \
      --seeds 2022,2023,2024 --root ../shared/data/movielens/ml-1m --out runs/ensemble \
      [--tag _aux05 -- --config.train.aux_rating.weight=0.5]

Each model runs `mscenario train --config.data.split.seed=S --config.sweep.seed=...`: the
split is held while the seed varies the init, so the replicas share the prepared data and
the sweep writes their ensemble's test metrics into sweep.json (train/sweep.py). The
replica with seed == split seed is the protocol's own run on that split.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_sweep(config: str, workdir: str, split_seed: int, seeds: list[int], root: str,
              extra: list[str]) -> dict:
  path = os.path.join(workdir, "sweep.json")
  if not os.path.exists(path):
    cmd = [sys.executable, "-m", "mscenario", "train", "--config", config, "--workdir", workdir,
           f"--config.data.split.seed={split_seed}",
           f"--config.sweep.seed={','.join(map(str, seeds))}",
           *([f"--config.data.root={root}"] if root else []), *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
      raise SystemExit(f"sweep failed ({workdir}):\n{done.stderr[-3000:]}")
    print(f"  {time.time() - t0:.0f} s", flush=True)
  with open(path) as f:
    summary = json.load(f)
  if "ensemble" not in summary:
    raise SystemExit(f"{path}: no 'ensemble' entry (the replicas' prepared data differ?)")
  return summary


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="ml1m", help="config prefix: ml1m | ml100k")
  p.add_argument("--models", default="star,mmoe")
  p.add_argument("--split-seed", type=int, default=2022)
  p.add_argument("--seeds", default="2022,2023,2024", help="init seeds of the replicas")
  p.add_argument("--root", default="", help="data.root (default: the data dir)")
  p.add_argument("--out", default="runs/ensemble")
  p.add_argument("--tag", default="", help="suffix for work dirs and the table")
  p.add_argument("extra", nargs="*", help="extra --config.x=y overrides (after --)")
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  lines = ["| model | single replica AUC (mean ± std) | best single | ensemble AUC | gain | "
           "ensemble LogLoss | single LogLoss (mean) | ensemble per scenario |",
           "|---|---|---|---|---|---|---|---|"]
  for model in args.models.split(","):
    config = os.path.join(REPO, "configs", f"{args.dataset}_{model}.py")
    workdir = os.path.join(args.out, f"{args.dataset}_{model}{args.tag}_split{args.split_seed}")
    s = run_sweep(config, workdir, args.split_seed, seeds, args.root, args.extra)
    single = np.asarray(s["test_auc"]["values"])
    ens = s["ensemble"]["overall"]
    per = ", ".join(f"{k} {v['auc']:.4f}" for k, v in s["ensemble"]["scenarios"].items())
    lines.append(f"| {model}{args.tag} | {single.mean():.4f} ± {single.std(ddof=1):.4f} | "
                 f"{single.max():.4f} | **{ens['auc']:.4f}** | {ens['auc'] - single.mean():+.4f} | "
                 f"{ens['logloss']:.4f} | {s['test_logloss']['mean']:.4f} | {per} |")
  table = "\n".join(lines)
  print(table)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"table_{args.dataset}{args.tag}.md"), "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  main()
