"""Dynamic adaptation on ML-1M: a model updated after each period vs. one frozen after base.

  MSCENARIO_CACHE=/tmp/mscache python benchmarks/adaptation.py \
      --root ../shared/data/movielens/ml-1m --model sharedbottom --out runs/adaptation

Rows sorted by timestamp: the first 60% train the base model (55% train + 5% validation for
early stopping: an ordinary `mscenario train` with a temporal split), the remaining 40% are
cut into --periods equal periods. Model B stays frozen after base training; model A is a copy
updated with `mscenario update` (one epoch, vocabularies growing into reserved rows) after
each period. Both are scored on the *next* period before A sees it, so every AUC is on
future events. Prints a Markdown table; writes adaptation.json and adaptation.png to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BASE_RATIOS = (0.55, 0.05, 0.40)


def score(workdir: str, table):
  """Probabilities of `table`'s rows under the work dir's latest checkpoint and transform."""
  from mscenario.data.prepare import PreparedData
  from mscenario.parallel import mesh as mesh_lib
  from mscenario.train import checkpoint as ckpt_lib
  from mscenario.train import loop
  from mscenario.train.update import load_workdir
  config, transform = load_workdir(workdir)
  arrays, _, _ = transform.apply(table, on_error=config.data.on_error)
  data = PreparedData(path="", arrays=arrays, splits={"eval": np.arange(len(arrays["label"]))},
                      transform=transform, meta={"fingerprint": ""})
  setup = loop.build(config, data, mesh_lib.make_mesh(config.mesh))
  ckpts = ckpt_lib.Checkpoints(workdir, config.train.keep_checkpoints)
  try:
    state, _ = ckpts.restore_latest(setup.abstract_state)
  finally:
    ckpts.close()
  return loop.predict(setup, state, "eval"), arrays


def _auc(labels, probs):
  from mscenario.metrics import auc
  if len(labels) < 2 or labels.min() == labels.max():
    return float("nan")
  return float(auc(labels, probs))


def plot(rows, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  x = [r["period"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 3.6))
  ax.plot(x, [r["auc_frozen"] for r in rows], "o-", label="frozen after base (B)")
  ax.plot(x, [r["auc_updated"] for r in rows], "s-", label="updated each period (A)")
  ax.set_xticks(x)
  ax.set_xlabel("evaluation period (A has seen every earlier period)")
  ax.set_ylabel("AUC")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--root", default="", help="ML-1M data.root")
  p.add_argument("--model", default="sharedbottom")
  p.add_argument("--epochs", type=int, default=2, help="base training epochs")
  p.add_argument("--update-epochs", type=int, default=1)
  p.add_argument("--periods", type=int, default=4)
  p.add_argument("--reserve", type=float, default=0.2, help="data.reserve_fraction")
  p.add_argument("--out", default="runs/adaptation")
  p.add_argument("extra", nargs="*", help="extra --config.x=y overrides (after --)")
  args = p.parse_args()

  from mscenario.config import load_config
  from mscenario.data import schema as schema_lib
  from mscenario.data.sources import load_source
  from mscenario.train import loop
  from mscenario.train.update import update_table

  out = os.path.abspath(args.out)
  base_dir, upd_dir = os.path.join(out, "base"), os.path.join(out, "updated")
  overrides = [*([f"--config.data.root={args.root}"] if args.root else []),
               "--config.data.split.kind=temporal",
               f"--config.data.split.ratios={BASE_RATIOS}",
               f"--config.data.reserve_fraction={args.reserve}",
               f"--config.train.epochs={args.epochs}", *args.extra]
  config = load_config(os.path.join(REPO, "configs", f"ml1m_{args.model}.py"), overrides)
  t0 = time.time()
  if not os.path.exists(os.path.join(base_dir, "results.json")):
    loop.train(config, base_dir)
  base_s = time.time() - t0

  # The same order and cut as the temporal split the base model was trained with.
  table = load_source(config.data)
  order = np.argsort(np.asarray(table.columns[config.data.time_field], np.float64),
                     kind="stable")
  cut = int(np.cumsum(BASE_RATIOS)[1] * table.num_rows)
  periods = np.array_split(order[cut:], args.periods)

  if os.path.exists(upd_dir):
    shutil.rmtree(upd_dir)
  shutil.copytree(base_dir, upd_dir, ignore=shutil.ignore_patterns("tensorboard"))
  rows, updates = [], []
  for k, idx in enumerate(periods, start=1):
    part = table.take(np.sort(idx))
    probs_b, arr_b = score(base_dir, part)
    probs_a, _ = score(upd_dir, part)
    labels = arr_b["label"]
    names = [f.name for f in _schema(base_dir).sparse]
    new = np.zeros(len(labels), bool)
    for feat in ("user_id", "item_id"):
      if feat in names:
        new |= arr_b["sparse"][:, names.index(feat)] == schema_lib.OOV_ID
    t = table.columns[config.data.time_field][idx]
    rows.append({
        "period": k, "rows": int(len(labels)),
        "from": time.strftime("%Y-%m-%d", time.gmtime(float(t.min()))),
        "to": time.strftime("%Y-%m-%d", time.gmtime(float(t.max()))),
        "new_id_share": float(new.mean()),
        "auc_frozen": _auc(labels, probs_b), "auc_updated": _auc(labels, probs_a),
        "auc_new_frozen": _auc(labels[new], probs_b[new]),
        "auc_new_updated": _auc(labels[new], probs_a[new])})
    print(json.dumps(rows[-1]), flush=True)
    if k < len(periods):  # A learns period k, then both face period k + 1
      updates.append(update_table(upd_dir, part, epochs=args.update_epochs,
                                  source=f"period {k}"))

  with open(os.path.join(out, "adaptation.json"), "w") as f:
    json.dump({"model": args.model, "base_epochs": args.epochs,
               "update_epochs": args.update_epochs, "reserve_fraction": args.reserve,
               "base_train_s": base_s, "periods": rows,
               "updates": [{k: u[k] for k in ("update", "rows", "step_from", "step_to", "loss",
                                              "growth", "seconds")} for u in updates]},
              f, indent=2)
  title = (f"ML-1M temporal, {args.model}: base = first 60%, then {args.periods} periods "
           f"of {40 // args.periods}% (reserve {args.reserve:g})")
  plot(rows, os.path.join(out, "adaptation.png"), title)
  print(f"\n{title}\n")
  print("| period | dates | rows | rows with new user/item | AUC frozen (B) | AUC updated (A) "
        "| Δ | new-id rows: B | new-id rows: A |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['period']} | {r['from']} – {r['to']} | {r['rows']:,} | "
          f"{100 * r['new_id_share']:.1f}% | {r['auc_frozen']:.4f} | {r['auc_updated']:.4f} | "
          f"{r['auc_updated'] - r['auc_frozen']:+.4f} | {r['auc_new_frozen']:.4f} | "
          f"{r['auc_new_updated']:.4f} |")
  for u in updates:
    grown = ", ".join(f"{g['feature']} +{g['added']}" + (f" ({g['oov_values']} OOV)"
                                                         if g["oov_values"] else "")
                      for g in u["growth"]) or "none"
    print(f"update {u['update']}: {u['rows']:,} rows, steps {u['step_from']} -> "
          f"{u['step_to']}, {u['seconds']:.0f}s; vocabulary growth: {grown}")
  print(f"\nplot: {os.path.join(out, 'adaptation.png')}")


def _schema(workdir: str):
  from mscenario.data.transform import Transform
  with open(os.path.join(workdir, "transform.json")) as f:
    return Transform(json.load(f)).schema


if __name__ == "__main__":
  main()
