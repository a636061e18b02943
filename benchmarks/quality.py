"""Models x seeds on one data set -> a Markdown table of test AUC / LogLoss (mean ± std),
overall and per scenario, with parameters, train time and examples/s.

  python benchmarks/quality.py --dataset ml1m --models seed,sharedbottom,mmoe,ple,star \
      --seeds 2022,2023,2024 --root ../shared/data/movielens/ml-1m --out runs/quality

The seeds of a model train as one vectorised sweep (`--config.sweep.seed=...`, one program,
replica work dirs `<out>/<dataset>_<model><tag>_sweep/seed=<s>`); `--sequential` runs them one
after another instead (`<out>/<dataset>_<model><tag>_s<seed>`). Either way each replica is an
ordinary run in its own work dir (finished ones are reused), so any row can be reproduced or
inspected on its own.
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


def run_one(config, workdir, seed, root, extra):
  if os.path.exists(os.path.join(workdir, "results.json")):
    return
  cmd = [sys.executable, "-m", "mscenario", "train", "--config", config, "--workdir", workdir,
         f"--config.seed={seed}", *([f"--config.data.root={root}"] if root else []), *extra]
  print("$", " ".join(cmd), flush=True)
  t0 = time.time()
  done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True)
  if done.returncode != 0:
    raise SystemExit(f"run failed ({workdir}):\n{done.stderr[-3000:]}")
  with open(os.path.join(workdir, "timing.json"), "w") as f:
    json.dump({"wall_s": time.time() - t0}, f)


def run_sweep(config, workdir, seeds, root, extra):
  """All seeds as one vectorised sweep; each replica's timing.json gets the sweep's wall time
  divided by the number of replicas."""
  dirs = [os.path.join(workdir, f"seed={s}") for s in seeds]
  if all(os.path.exists(os.path.join(d, "results.json")) for d in dirs):
    return dirs
  cmd = [sys.executable, "-m", "mscenario", "train", "--config", config, "--workdir", workdir,
         f"--config.sweep.seed={','.join(map(str, seeds))}",
         *([f"--config.data.root={root}"] if root else []), *extra]
  print("$", " ".join(cmd), flush=True)
  t0 = time.time()
  done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True)
  if done.returncode != 0:
    raise SystemExit(f"sweep failed ({workdir}):\n{done.stderr[-3000:]}")
  for d in dirs:
    with open(os.path.join(d, "timing.json"), "w") as f:
      json.dump({"wall_s": (time.time() - t0) / len(seeds)}, f)
  return dirs


def summarize(workdir):
  res = json.load(open(os.path.join(workdir, "results.json")))
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  eps = [l["examples_per_sec"] for l in lines if "examples_per_sec" in l]
  timing = json.load(open(os.path.join(workdir, "timing.json"))) if os.path.exists(
      os.path.join(workdir, "timing.json")) else {}
  return res, float(np.median(eps)) if eps else float("nan"), timing.get("wall_s", float("nan"))


def fmt(values, digits=4):
  v = np.asarray(values, float)
  return f"{v.mean():.{digits}f} ± {v.std(ddof=0):.{digits}f}"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="ml1m", help="config prefix: ml1m | ml100k")
  p.add_argument("--models", default="seed,sharedbottom,mmoe,ple,star")
  p.add_argument("--seeds", default="2022,2023,2024")
  p.add_argument("--root", default="", help="data.root (default: the data dir)")
  p.add_argument("--out", default="runs/quality")
  p.add_argument("--tag", default="", help="suffix for work dirs and the table title")
  p.add_argument("--sequential", action="store_true",
                 help="one run per seed instead of one vectorised sweep per model")
  p.add_argument("extra", nargs="*", help="extra --config.x=y overrides (after --)")
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = []
  scenario_names = None
  for model in args.models.split(","):
    config = os.path.join(REPO, "configs", f"{args.dataset}_{model}.py")
    if args.sequential:
      dirs = [os.path.join(args.out, f"{args.dataset}_{model}{args.tag}_s{seed}")
              for seed in seeds]
      for seed, workdir in zip(seeds, dirs):
        run_one(config, workdir, seed, args.root, args.extra)
    else:
      dirs = run_sweep(config, os.path.join(args.out, f"{args.dataset}_{model}{args.tag}_sweep"),
                       seeds, args.root, args.extra)
    per_seed = [summarize(d) for d in dirs]
    scenario_names = list(per_seed[0][0]["scenarios"])
    rows.append((model, per_seed))
  header = ["model", "overall AUC", "overall LogLoss"] + [f"{s} AUC" for s in scenario_names] + [
      "best epoch", "train ex/s per run (median)", "wall s / run"]
  out = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
  for model, per_seed in rows:
    res = [r for r, _, _ in per_seed]
    cells = [model, fmt([r["overall"]["auc"] for r in res]),
             fmt([r["overall"]["logloss"] for r in res])]
    cells += [fmt([r["scenarios"][s]["auc"] for r in res]) for s in scenario_names]
    cells += [",".join(str(r.get("best_epoch", "")) for r in res),
              f"{np.mean([e for _, e, _ in per_seed]):,.0f}",
              f"{np.mean([w for _, _, w in per_seed]):.0f}"]
    out.append(f"| {' | '.join(cells)} |")
  table = "\n".join(out)
  print(table)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"table_{args.dataset}{args.tag}.md"), "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  main()
