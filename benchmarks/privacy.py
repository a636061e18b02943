"""Privacy / utility on ML-1M: test AUC overall and per scenario under DP-SGD at several
epsilons (example level) and at one epsilon user level, against the same model trained
without privacy, with the training throughput of each.

  nice -n 19 python benchmarks/privacy.py --root ../shared/data/movielens/ml-1m \
      --out runs/privacy --epsilons 8,4,2,1 --user-epsilons 8

Model: the shipped MMoE config (configs/ml1m_mmoe.py) with model.batch_norm=false in every
run, private or not (BatchNorm is refused under DP: it mixes examples); `--config
configs/ml1m_star.py` runs STAR, whose partitioned normalisation is then per example. Each
run is an ordinary `mscenario train` in its own work dir (finished runs are reused).
Throughput: examples/s from metrics.jsonl, the loop's own count; for private runs the
physical batch includes padding, so the table reports sampled (real) examples/s =
loop rate x expected rows per step / physical batch.
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


def run(config, workdir, seed, root, extra):
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


def summarize(workdir):
  res = json.load(open(os.path.join(workdir, "results.json")))
  rates = [json.loads(line).get("examples_per_sec") for line in
           open(os.path.join(workdir, "metrics.jsonl"))]
  rate = float(np.median([r for r in rates if r]))
  priv = res.get("privacy")
  if priv:
    rate *= priv["expected_rows_per_step"] / priv["physical_batch"]
  return res, rate


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/ml1m_mmoe.py")
  p.add_argument("--root", default="", help="data.root (default: the data dir)")
  p.add_argument("--out", default="runs/privacy")
  p.add_argument("--seed", type=int, default=2022)
  p.add_argument("--epsilons", default="8,4,2,1", help="example-level targets")
  p.add_argument("--user-epsilons", default="8", help="user-level targets")
  p.add_argument("--extra", default="", help="more --config overrides for every run")
  p.add_argument("--private-extra", default="", help="--config overrides for private runs")
  p.add_argument("--user-extra", default="", help="--config overrides for user-level runs")
  p.add_argument("--dense-rows-epsilons", default="",
                 help="example-level targets also run with privacy.embed_noise=dense")
  p.add_argument("--schedule-baseline", action="store_true",
                 help="also train non-privately with the private runs' overrides")
  a = p.parse_args()
  common = ["--config.model.batch_norm=false", *a.extra.split()]
  private = a.private_extra.split()
  p_sched = a.schedule_baseline
  runs = [("non-private", [])]
  if p_sched:  # how much of the gap is the private runs' schedule (batch, lr, epochs) alone
    runs.append(("non-private, private schedule", private))
  user = [float(e) for e in a.user_epsilons.split(",") if e]
  example = [float(e) for e in a.epsilons.split(",") if e]
  # The headline pair first, so a cut-short benchmark still has it.
  for eps in example[:1]:
    runs.append((f"example, eps={eps:g}", [*private, "--config.privacy.enabled=true",
                                             f"--config.privacy.epsilon={eps}"]))
  for eps in user:
    runs.append((f"user, eps={eps:g}", [*private, *a.user_extra.split(),
                                          "--config.privacy.enabled=true",
                                          f"--config.privacy.epsilon={eps}",
                                          "--config.privacy.unit=user"]))
  for eps in example[1:]:
    runs.append((f"example, eps={eps:g}", [*private, "--config.privacy.enabled=true",
                                             f"--config.privacy.epsilon={eps}"]))
  for eps in [float(e) for e in a.dense_rows_epsilons.split(",") if e]:
    runs.append((f"example, eps={eps:g}, dense rows", [
        *private, "--config.privacy.enabled=true", f"--config.privacy.epsilon={eps}",
        "--config.privacy.embed_noise=dense"]))
  rows = []
  for name, extra in runs:
    wd = os.path.join(a.out, name.replace(", ", "_").replace("=", "").replace(" ", "-"))
    run(a.config, wd, a.seed, a.root, common + extra)
    rows.append((name, *summarize(wd)))
  base = rows[0][1]["overall"]["auc"]
  base_rate = rows[0][2]
  scen = list(rows[0][1]["scenarios"])
  print(f"\n{a.config}, seed {a.seed}, every run: {' '.join(common)}; private runs: "
        f"{' '.join(private)}; user level: {a.user_extra}\n")
  print("| run | epsilon (spent) | delta | noise mult. | steps | test AUC | vs non-private | "
        + " | ".join(f"AUC {s}" for s in scen) + " | examples/s | slowdown |")
  print("|" + "---|" * (9 + len(scen)))
  for name, res, rate in rows:
    priv = res.get("privacy") or {}
    eps = f"{priv['epsilon']:.3f}" if priv else "∞"
    delta = f"{priv['delta']:.2g}" if priv else "-"
    sigma = f"{priv['noise_multiplier']:.3f}" if priv else "-"
    steps = str(priv.get("steps", "-")) if priv else "-"
    auc = res["overall"]["auc"]
    per = " | ".join(f"{res['scenarios'][s]['auc']:.4f}" for s in scen)
    print(f"| {name} | {eps} | {delta} | {sigma} | {steps} | {auc:.4f} | {auc - base:+.4f} | "
          f"{per} | {rate:,.0f} | {base_rate / rate:.1f}x |")


if __name__ == "__main__":
  main()
