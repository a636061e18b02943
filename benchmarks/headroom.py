"""How much predictive signal is left beyond trained models? (issue 5's 0.830 question)

Takes finished work dirs trained on the same data and split (same seed), scores their
validation and test rows, and measures on test:
  * each model alone, and the plain average of their logits (an ensemble);
  * a logistic-regression stack fitted on VALIDATION rows of
      - the model logits,
      - + behaviour-history statistics (mean label / star rating of the last 1/5/20/K events,
        log number of earlier events: strictly-before features, as models/sequence.py),
      - + "session" statistics (the user's training-row label mean within the same hour /
        day / week of the row, excluding the row itself: timeSVD++-style user-day bias),
      - + user and item training-label means.
If a stack barely beats the models, the features we could add carry little new information;
the gap to a target above that is then not a matter of model capacity.

  python benchmarks/headroom.py --workdirs runs/zoo/mmoe_s2022,runs/zoo/seed_s2022 \
      --history-length 50
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _logit(p):
  p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
  return np.log(p / (1 - p))


def _with_defaults(saved: dict, defaults: dict) -> dict:
  out = dict(saved)
  for k, v in defaults.items():
    if k not in out:
      out[k] = v
    elif isinstance(v, dict) and isinstance(out[k], dict):
      out[k] = _with_defaults(out[k], v)
  return out


def model_logits(workdir: str) -> tuple[dict, object]:
  """{'valid': logits, 'test': logits} of a work dir's best checkpoint, and its config."""
  from ml_collections import ConfigDict

  from mscenario.config import base_config
  from mscenario.parallel import mesh as mesh_lib
  from mscenario.train import evaluate, loop
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  # Defaults fill keys added after the run was made, so older work dirs still load.
  config = ConfigDict(_with_defaults(saved, base_config().to_dict()))
  data = loop.load_data(config, log=lambda *_: None)
  setup = loop.build(config, data, mesh_lib.make_mesh(config.mesh),
                     evaluate._text_tables(config, workdir, data))
  state = evaluate._restore(setup, workdir)
  return {s: _logit(loop.predict(setup, state, s)) for s in ("valid", "test")}, config, data


def history_features(config, length: int, idx: np.ndarray) -> np.ndarray:
  from mscenario.models.sequence import history_stats
  from mscenario.train import loop
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.history.length = length
  data = loop.load_data(cfg, log=lambda *_: None)
  a = data.arrays
  return np.asarray(history_stats(np.asarray(a["hist_feedback"])[idx],
                                  np.asarray(a["hist_value"])[idx],
                                  np.asarray(a["hist_count"])[idx]))


def session_features(config, data, idx: np.ndarray) -> np.ndarray:
  from mscenario.data.sources import load_source
  table = load_source(config.data)
  if table.num_rows != len(data.arrays["label"]):
    raise SystemExit("session features need every raw row prepared (no skipped rows)")
  t = np.asarray(table.columns[config.data.time_field], np.float64)
  user = np.asarray(data.arrays["user"]).astype(np.int64)
  label = np.asarray(data.arrays["label"]).astype(np.float64)
  train = np.zeros(len(label), bool)
  train[data.splits["train"]] = True
  prior = label[train].mean()
  u_sum = np.bincount(user[train], label[train], user.max() + 1)
  u_cnt = np.bincount(user[train], minlength=user.max() + 1)
  u_mean = (u_sum[user] + 5 * prior) / (u_cnt[user] + 5)
  cols = []
  for width in (3600, 86400, 7 * 86400):
    key = user * 10**7 + (t // width).astype(np.int64)
    uniq, inv = np.unique(key, return_inverse=True)
    s = np.bincount(inv[train], label[train], len(uniq))[inv] - np.where(train, label, 0)
    c = np.bincount(inv[train], minlength=len(uniq))[inv] - train
    cols += [_logit((s + 3 * u_mean) / (c + 3)), np.log1p(c)]
  return np.stack(cols, 1)[idx]


def mean_features(data, idx: np.ndarray) -> np.ndarray:
  a = data.arrays
  label = np.asarray(a["label"]).astype(np.float64)
  tr = data.splits["train"]
  prior = label[tr].mean()
  cols = []
  for key in ("user", "item"):
    ids = np.asarray(a[key]).astype(np.int64)
    s = np.bincount(ids[tr], label[tr], ids.max() + 1)
    c = np.bincount(ids[tr], minlength=ids.max() + 1)
    cols.append(_logit((s[ids] + 5 * prior) / (c[ids] + 5)))
  return np.stack(cols, 1)[idx]


def main(argv=None):
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import roc_auc_score
  from sklearn.preprocessing import StandardScaler
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdirs", required=True, help="comma-separated, same data and seed")
  p.add_argument("--history-length", type=int, default=50)
  p.add_argument("--out", default="", help="write the results as JSON here")
  args = p.parse_args(argv)
  os.environ.setdefault("MSCENARIO_CACHE", "/tmp/mscache")
  logits, names = [], []
  for wd in args.workdirs.split(","):
    lg, config, data = model_logits(wd)
    logits.append(lg)
    names.append(os.path.basename(os.path.normpath(wd)))
  splits = {s: data.splits[s] for s in ("valid", "test")}
  y = {s: np.asarray(data.arrays["label"])[i] for s, i in splits.items()}
  base = {s: np.stack([lg[s] for lg in logits], 1) for s in splits}
  groups = {"history": {s: history_features(config, args.history_length, i)
                        for s, i in splits.items()},
            "session": {s: session_features(config, data, i) for s, i in splits.items()},
            "means": {s: mean_features(data, i) for s, i in splits.items()}}
  results = {n: roc_auc_score(y["test"], base["test"][:, k]) for k, n in enumerate(names)}
  if len(names) > 1:
    results["average of logits"] = roc_auc_score(y["test"], base["test"].mean(1))

  def stack(extra):
    xs = {s: np.concatenate([base[s]] + [groups[g][s] for g in extra], 1) for s in splits}
    scaler = StandardScaler().fit(xs["valid"])
    lr = LogisticRegression(max_iter=5000).fit(scaler.transform(xs["valid"]), y["valid"])
    return roc_auc_score(y["test"], lr.decision_function(scaler.transform(xs["test"])))

  results["stack: models"] = stack([])
  for extra in (["history"], ["session"], ["means"], ["history", "session", "means"]):
    results["stack: models + " + " + ".join(extra)] = stack(extra)
  width = max(map(len, results))
  print(f"test AUC ({len(y['test']):,} rows; stacks fitted on {len(y['valid']):,} "
        "validation rows)")
  for k, v in results.items():
    print(f"  {k:<{width}}  {v:.4f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"workdirs": args.workdirs.split(","), "test_auc": results}, f, indent=2)


if __name__ == "__main__":
  main()
