"""Language-model features on ML-1M (issue 4 §4): id-only vs text-assisted models.

Runs one `mscenario train` at a time (subprocesses, so each run is a clean process) and
summarises test AUC as mean ± std over seeds, overall, per scenario and — with
--cold-items — on the held-out items' rows.

  # 1. core models with / without text
  python benchmarks/text_eval.py --models star --variants id,gate,concat --seeds 2022,2023,2024
  # 2. cold-start items (10% of items held out entirely)
  python benchmarks/text_eval.py --models star --variants id,gate,text_only --cold-items 0.1
  # 3. unseen scenario: train on two age groups, score the third from its description
  python benchmarks/text_eval.py --models seed --variants id,scenario --holdout-scenario senior

Variants: id (text off), concat | gate | text_only (item text fusion), scenario (scenario
context from its description only), and `<fusion>+scenario` for both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ML1M = os.path.join(os.path.dirname(REPO), "shared", "data", "movielens", "ml-1m")


def variant_overrides(variant: str) -> list[str]:
  if variant == "id":
    return []
  parts = variant.split("+")
  fusion = "none"
  scenario = False
  for p in parts:
    if p == "scenario":
      scenario = True
    elif p in ("concat", "gate", "text_only"):
      fusion = p
    else:
      raise SystemExit(f"unknown variant {variant!r}")
  return ["--config.text.enabled=true", f"--config.text.fusion={fusion}",
          f"--config.text.scenario_context={str(scenario).lower()}"]


def run_one(model: str, variant: str, seed: int, args) -> dict:
  tag = f"{model}_{variant.replace('+', '-')}_s{seed}"
  workdir = os.path.join(args.out, tag)
  results = os.path.join(workdir, "results.json")
  if not os.path.isfile(results):
    cmd = [sys.executable, "-m", "mscenario", "train", "--config",
           os.path.join(REPO, "configs", f"ml1m_{model}.py"), "--workdir", workdir,
           f"--config.seed={seed}", f"--config.data.root={args.root}",
           *variant_overrides(variant), *args.extra]
    if args.cold_items:
      cmd.append(f"--config.data.cold_items={args.cold_items}")
    if args.holdout_scenario:
      cmd.append(f"--config.data.holdout_scenario={args.holdout_scenario}")
    if args.epochs:
      cmd.append(f"--config.train.epochs={args.epochs}")
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "stdout.log"), "w") as log:
      subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    print(f"  {tag}: {time.time() - t0:.0f}s", flush=True)
  with open(results) as f:
    r = json.load(f)
  row = {"model": model, "variant": variant, "seed": seed, "auc": r["overall"]["auc"],
         "logloss": r["overall"]["logloss"], "best_epoch": r.get("best_epoch"),
         "scenarios": {k: v["auc"] for k, v in r["scenarios"].items()}}
  if "cold_items" in r:
    row["cold_auc"] = r["cold_items"].get("auc")
  return row


def _ms(values):
  values = [v for v in values if v is not None]
  if not values:
    return ""
  sd = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def summarise(rows: list[dict]) -> str:
  keys = sorted({(r["model"], r["variant"]) for r in rows}, key=lambda k: (k[0], k[1] != "id"))
  scen = sorted({s for r in rows for s in r["scenarios"]})
  cold = any("cold_auc" in r for r in rows)
  head = (["model", "variant", "seeds", "overall AUC", "Δ vs id (paired)", "2σ of id", *scen]
          + (["cold-item AUC", "cold Δ vs id"] if cold else []))
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m, v in keys:
    rs = [r for r in rows if r["model"] == m and r["variant"] == v]
    ids = {r["seed"]: r for r in rows if r["model"] == m and r["variant"] == "id"}
    paired = [(r, ids[r["seed"]]) for r in rs if r["seed"] in ids and v != "id"]
    id_aucs = [r["auc"] for r in ids.values()]
    two_sigma = f"{2 * statistics.stdev(id_aucs):.4f}" if len(id_aucs) > 1 else ""
    cells = [m, v, str(len(rs)), _ms([r["auc"] for r in rs]),
             _ms([a["auc"] - b["auc"] for a, b in paired]) if paired else "",
             two_sigma if v == "id" else "",
             *(_ms([r["scenarios"].get(s) for r in rs]) for s in scen)]
    if cold:
      cells.append(_ms([r.get("cold_auc") for r in rs]))
      cells.append(_ms([a.get("cold_auc") - b.get("cold_auc") for a, b in paired
                        if a.get("cold_auc") is not None and b.get("cold_auc") is not None])
                   if paired else "")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="star")
  p.add_argument("--variants", default="id,gate")
  p.add_argument("--seeds", default="2022")
  p.add_argument("--cold-items", type=float, default=0.0)
  p.add_argument("--holdout-scenario", default="")
  p.add_argument("--epochs", type=int, default=0, help="0 = the config's")
  p.add_argument("--root", default=ML1M)
  p.add_argument("--out", default="/tmp/text_eval")
  p.add_argument("extra", nargs="*", help="more --config.x=y overrides")
  args = p.parse_args(argv)
  os.environ.setdefault("MSCENARIO_CACHE", "/tmp/mscache")
  rows = [run_one(m, v, int(s), args) for m in args.models.split(",")
          for v in args.variants.split(",") for s in args.seeds.split(",")]
  os.makedirs(args.out, exist_ok=True)
  table = summarise(rows)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump({"rows": rows, "table": table, "argv": sys.argv[1:]}, f, indent=2)
  print(table)


if __name__ == "__main__":
  main()
