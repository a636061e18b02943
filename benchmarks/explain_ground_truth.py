"""Ground-truth recovery of explanations: on the synthetic world with configured per-scenario
feature importance (data.synthetic.importance), train each model, explain its test rows and
report Spearman(configured weights, mean |IG attribution|) per scenario, AUC vs Bayes, the
completeness residual, and how often shuffled attributions pass the same criterion.

  python benchmarks/explain_ground_truth.py --models mmoe,star,sharedbottom --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from mscenario.config import MODEL_DEFAULTS, load_config
from mscenario.data.synthetic import IMPORTANCE_FEATURES
from mscenario.explain import summary
from mscenario.explain.attribute import Explainer
from mscenario.explain.run import load_run
from mscenario.train.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORTANCE = ((1.0, 1.5, 0.0, 0.0, 0.0, 0.5),
              (0.0, 0.0, 1.0, 1.5, 0.0, 0.5),
              (0.0, 0.0, 0.5, 0.0, 1.0, 1.5))

# Small layers, for whichever of these the model has (its subtree c.model.<name>).
SMALL_SIZES = {"hidden": "(32,16)", "aux_hidden": "(8,)", "expert_hidden": "(16,)",
               "tower_hidden": "(8,)"}


def one(model: str, seed: int, rows: int, root: str) -> dict:
  over = [f"--config.data.synthetic.importance={IMPORTANCE}",
          f"--config.data.synthetic.num_rows={rows}", "--config.data.synthetic.num_users=300",
          "--config.data.synthetic.num_items=200", f"--config.data.synthetic.seed={seed}",
          f"--config.seed={seed}", f"--config.model.name={model}",
          *[f"--config.model.{model}.{k}={v}" for k, v in SMALL_SIZES.items()
            if k in MODEL_DEFAULTS[model]],
          "--config.train.batch_size=512", "--config.train.epochs=6",
          "--config.train.learning_rate=3e-3", "--config.train.patience=0"]
  wd = os.path.join(root, f"{model}-{seed}")
  res = train(load_config(os.path.join(REPO, "configs", "synthetic.py"), over), wd,
              log=lambda *a: None)
  r = load_run(wd, log=lambda *a: None)
  ex = Explainer(r.setup.model, r.setup.model.schema, r.state, r.data.arrays,
                 r.data.splits["train"])
  a = ex.explain(r.data.arrays, r.data.splits["test"][:3000], progress=False)
  cols = [a.groups.names.index(f) for f in IMPORTANCE_FEATURES]
  table = summary.per_scenario_mean_abs(a.attr, a.scenario, 3)[:, cols]
  rho = [summary.spearman(np.asarray(IMPORTANCE[s]), table[s]) for s in range(3)]
  rng = np.random.default_rng(0)
  shuffled = [min(summary.spearman(np.asarray(IMPORTANCE[s]), table[s][rng.permutation(6)])
                  for s in range(3)) for _ in range(1000)]
  gap = np.abs(a.logit - a.base_logit)
  return {"model": model, "seed": seed, "spearman": [round(x, 3) for x in rho],
          "auc": {k: round(v["auc"], 4) for k, v in res["scenarios"].items()},
          "bayes_auc": {k: round(v["bayes_auc"], 4) for k, v in res["scenarios"].items()},
          "max_residual": float(np.abs(a.residual).max()),
          "max_residual_over_1_plus_gap": float((np.abs(a.residual) / (1 + gap)).max()),
          "shuffled_pass_rate": float(np.mean(np.asarray(shuffled) >= 0.8)),
          "shuffled_mean_min_spearman": float(np.mean(shuffled))}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="mmoe,star,sharedbottom")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--rows", type=int, default=50_000)
  args = p.parse_args()
  out = []
  with tempfile.TemporaryDirectory() as root:
    for model in args.models.split(","):
      for seed in map(int, args.seeds.split(",")):
        out.append(one(model, seed, args.rows, root))
        print(json.dumps(out[-1]), flush=True)


if __name__ == "__main__":
  main()
