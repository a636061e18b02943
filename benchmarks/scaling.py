"""Test AUC against training-set size on the synthetic world, beside its Bayes-optimal AUC.

The synthetic world knows every row's true click probability, so the AUC of the truth on the
test split is the ceiling any model can reach; the gap to it, as rows grow, shows how sample-
efficient a model and its training recipe are and where learning stalls.

  nice -n 19 python benchmarks/scaling.py --out runs/scaling            # 10^5 .. 10^7 rows x 3 widths
  python benchmarks/scaling.py --small --out /tmp/scaling               # two tiny sizes, seconds
  python benchmarks/scaling.py --rows 1e5,1e6 --widths 1 -- --config.model.name=mmoe

Writes OUT/scaling.json (every point and how it was made), OUT/scaling.md (rows, width, test
AUC, Bayes AUC, gap, examples/s, wall time) and OUT/scaling.png (test AUC against rows, log x,
the Bayes-optimal AUC as a dashed line; the gap on log-log axes beside it). Each point is an
ordinary training run in OUT/runs/w<width>_r<rows>; finished runs are reused, so an interrupted
sweep picks up where it stopped. A width multiplies every layer size of the model (those of
hidden, aux_hidden, expert_hidden, tower_hidden in its subtree c.model.<name>).

Beside the model, each size gets a reference learner that is told the world (every item's
per-scenario interest key and bias, the scenario effects, each user's feature effects and the
population's prior over user vectors) and estimates only what is private to a user -- the
interest vector and bias level -- by MAP from that user's training rows (`user_oracle`). Its
gap is roughly the floor for any model that learns from the same rows: models also have to
learn the item side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import mscenario  # noqa: E402
from mscenario.data.synthetic import SyntheticWorld  # noqa: E402
from mscenario.metrics.classification import auc as auc_of  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, "configs", "synthetic.py")
DEFAULT_ROWS = (100_000, 300_000, 1_000_000, 3_000_000, 10_000_000)
DEFAULT_WIDTHS = (0.5, 1.0, 2.0)
WIDTH_KEYS = ("hidden", "aux_hidden", "expert_hidden", "tower_hidden")
# --small: a small world and model, so two sizes train in seconds (the CI test runs this);
# 10x more rows must still close a large part of the gap there.
SMALL_ROWS = (4_000, 40_000)
SMALL_SIZES = {"hidden": (32, 16), "aux_hidden": (8,)}  # of whichever the model has
SMALL_WIDTHS = (1.0,)
SMALL_OVERRIDES = (
    "data.synthetic.num_users=300", "data.synthetic.num_items=200",
    "train.batch_size=256",
    "train.eval_batch_size=4096", "train.epochs=4", "train.patience=0",
    "train.log_every_steps=20",
)


def _number(text: str) -> float:
  """'1e6', '3e5', '1000000', '1_000_000' -> float."""
  try:
    return float(text.replace("_", ""))
  except ValueError:
    raise SystemExit(f"not a number: {text!r}") from None


def parse_rows(text: str) -> list[int]:
  rows = [int(_number(t)) for t in text.split(",") if t.strip()]
  if not rows or min(rows) < 1000:
    raise SystemExit(f"--rows {text}: expected comma-separated sizes >= 1000 (e.g. 1e5,1e6)")
  return sorted(set(rows))


def parse_widths(text: str) -> list[float]:
  widths = [_number(t) for t in text.split(",") if t.strip()]
  if not widths or min(widths) <= 0:
    raise SystemExit(f"--widths {text}: expected comma-separated factors > 0 (e.g. 0.5,1,2)")
  return sorted(set(widths))


def scaled(sizes, factor: float) -> tuple[int, ...]:
  return tuple(max(1, int(round(s * factor))) for s in sizes)


def width_label(factor: float) -> str:
  return f"{factor:g}"


def point_config(config_path: str, rows: int, width: float, overrides, sizes=None):
  """The config of one point: the file, the user's overrides, the size, the width (of the
  model's own layers, after setting those of `sizes` it has)."""
  config = mscenario.load_config(config_path, list(overrides))
  own = config.model[config.model.name]
  config.data.synthetic.num_rows = int(rows)
  if config.data.source != "synthetic":
    raise SystemExit(f"{config_path}: data.source is {config.data.source!r}; the scaling "
                     "benchmark needs the synthetic world (it knows the Bayes-optimal AUC)")
  for key, value in (sizes or {}).items():
    if key in own:
      own[key] = value
  for key in WIDTH_KEYS:
    if key in own:
      own[key] = scaled(own[key], width)
  return config


def layer_sizes(config) -> list[int]:
  """The model's first listed layer widths (hidden, else expert_hidden), for the tables."""
  own = config.model[config.model.name]
  return list(own.get("hidden", own.get("expert_hidden", ())))


def summarize(workdir: str) -> dict:
  """Test AUC, Bayes AUC, epochs and the loop's examples/s of one finished run."""
  res = json.load(open(os.path.join(workdir, "results.json")))
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  speed = [r for r in records if "examples_per_sec" in r]
  # The first epoch's figures include compilation; later epochs are the steady loop.
  steady = [r["examples_per_sec"] for r in speed if r.get("epoch", 0) >= 1] or [
      r["examples_per_sec"] for r in speed]
  valid = [r["valid_auc"] for r in records if "valid_auc" in r]
  overall = res["overall"]
  if "bayes_auc" not in overall:
    raise SystemExit(f"{workdir}/results.json has no bayes_auc (not a synthetic run?)")
  return {
      "test_auc": overall["auc"], "bayes_auc": overall["bayes_auc"],
      "gap": overall["bayes_auc"] - overall["auc"], "test_logloss": overall["logloss"],
      "test_rows": overall["n"], "train_rows": res["split"]["train"]
      if isinstance(res.get("split"), dict) and "train" in res["split"] else None,
      "best_epoch": res["best_epoch"], "epochs_run": len(valid), "valid_auc": valid,
      "examples_per_sec": float(np.median(steady)) if steady else float("nan"),
  }


def run_point(config, workdir: str, quiet: bool) -> dict:
  """Train one point unless its work dir already holds results; returns its summary."""
  timing_path = os.path.join(workdir, "scaling_timing.json")
  params = None
  if not (os.path.exists(os.path.join(workdir, "results.json"))
          and os.path.exists(timing_path)):
    messages = []

    def log(msg, *_a, **_k):
      messages.append(str(msg))
      if not quiet:
        print(msg, flush=True)

    t0 = time.perf_counter()
    mscenario.train(config, workdir, log=log)
    wall = time.perf_counter() - t0
    for m in messages:
      hit = re.search(r"\(([\d,]+) parameters\)", m)
      if hit:
        params = int(hit.group(1).replace(",", ""))
    with open(timing_path, "w") as f:
      json.dump({"wall_s": wall, "parameters": params}, f)
  timing = json.load(open(timing_path))
  out = summarize(workdir)
  out["wall_s"] = timing["wall_s"]
  out["parameters"] = timing.get("parameters")
  return out


def user_oracle(config, iterations: int = 10) -> dict | None:
  """Test AUC of a learner told everything but each user's private parameters, on the run's
  own test rows (None where the split is not a plain random one, or the world is additive).

  Per user u: theta_u = (interest vector, bias level in scenario 0); the rest of the logit
  (scenario base, item key and bias, the user's scenario-s minus scenario-0 bias difference,
  which holds only feature effects) is given. Prior: Gaussian with the mean and covariance of
  the true theta over users of the same age bucket. theta_u is the MAP from u's training rows
  (Newton's method, all users at once).
  """
  d = config.data
  if (d.split.kind != "random" or len(d.synthetic.importance) or d.cold_items
      or d.holdout_scenario):
    return None
  world = SyntheticWorld(d.synthetic)
  n = world.num_rows
  cols = world.rows(0, n)
  # The trainer's random split (mscenario/data/prepare.py): the same permutation and cuts.
  seed = d.split.seed if d.split.seed >= 0 else config.seed
  order = np.random.default_rng(seed).permutation(n)
  cuts = (np.cumsum(np.asarray(d.split.ratios, np.float64))[:2] * n).astype(np.int64)
  train, test = order[:cuts[0]], np.sort(order[cuts[1]:])
  s = cols["scenario"].astype(np.int64)
  u = cols["user_id"].astype(np.int64)
  i = cols["item_id"].astype(np.int64)
  y = cols["label"].astype(np.float64)
  # The generator's own parameters (read from its private arrays: this learner is told them).
  key = world._item_key[s * world.num_items + i].astype(np.float64)        # [n, latent]
  x = np.concatenate([key, np.ones((n, 1))], axis=1)                        # theta_u's inputs
  del key
  bias = world._user_bias                                                    # [S, users]
  offset = world.scenario_base[s] + world.item_bias[i] + bias[s, u] - bias[0, u]
  truth = np.concatenate([world._user_vec.astype(np.float64), bias[0][:, None]], axis=1)
  nu, k = world.num_users, x.shape[1]
  mean = np.zeros((nu, k))
  prec = np.zeros((nu, k, k))
  for age in np.unique(world.user_age):
    m = world.user_age == age
    cov = np.cov(truth[m].T) if m.sum() > k else np.cov(truth.T)
    mean[m] = truth[m].mean(axis=0)
    prec[m] = np.linalg.inv(cov + 1e-6 * np.eye(k))
  theta = mean.copy()
  xt, ut, yt, ot = x[train], u[train], y[train], offset[train]
  pairs = [(a, b) for a in range(k) for b in range(a, k)]
  for _ in range(iterations):
    p = 1.0 / (1.0 + np.exp(-(ot + np.einsum("nk,nk->n", xt, theta[ut]))))
    r, w = yt - p, p * (1.0 - p)
    grad = np.stack([np.bincount(ut, r * xt[:, a], minlength=nu) for a in range(k)], axis=1)
    grad -= np.einsum("uij,uj->ui", prec, theta - mean)
    hess = prec.copy()
    for a, b in pairs:
      h = np.bincount(ut, w * xt[:, a] * xt[:, b], minlength=nu)
      hess[:, a, b] += h
      if a != b:
        hess[:, b, a] += h
    theta = theta + np.linalg.solve(hess, grad[..., None])[..., 0]
  logit = offset[test] + np.einsum("nk,nk->n", x[test], theta[u[test]])
  return {"oracle_auc": float(auc_of(y[test], logit)),
          "oracle_bayes_auc": float(auc_of(y[test], cols["truth"][test]))}


def oracle_point(config, path: str) -> dict | None:
  """user_oracle for one size, cached in `path` (it depends on the world and split only)."""
  if os.path.exists(path):
    return json.load(open(path))
  t0 = time.perf_counter()
  out = user_oracle(config)
  if out is not None:
    out["oracle_wall_s"] = time.perf_counter() - t0
  with open(path, "w") as f:
    json.dump(out, f)
  return out


def markdown(points: list[dict], title: str) -> str:
  head = ["rows", "width", "hidden", "params", "test AUC", "Bayes AUC", "gap",
          "user-oracle gap", "best epoch", "train ex/s", "wall s"]
  lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for p in points:
    lines.append("| " + " | ".join([
        f"{p['rows']:,}", width_label(p["width"]), str(tuple(p["hidden"])),
        f"{p['parameters']:,}" if p.get("parameters") else "?",
        f"{p['test_auc']:.4f}", f"{p['bayes_auc']:.4f}", f"{p['gap']:.4f}",
        f"{p['oracle_gap']:.4f}" if p.get("oracle_gap") is not None else "-",
        f"{p['best_epoch']}/{p['epochs_run']}", f"{p['examples_per_sec']:,.0f}",
        f"{p['wall_s']:.0f}"]) + " |")
  return "\n".join(lines) + "\n"


def plot(points: list[dict], path: str, title: str) -> None:
  widths = sorted({p["width"] for p in points})
  rows = sorted({p["rows"] for p in points})
  fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(10, 4))
  bayes = [float(np.mean([p["bayes_auc"] for p in points if p["rows"] == r])) for r in rows]
  ax.plot(rows, bayes, "k--", label="Bayes-optimal")
  oracle = sorted({(p["rows"], p["oracle_auc"], p["oracle_gap"]) for p in points
                   if p.get("oracle_auc") is not None})
  if oracle:
    label = "learner told all but the users' own vectors"
    ax.plot([o[0] for o in oracle], [o[1] for o in oracle], "k:", marker=".", label=label)
    ax_gap.plot([o[0] for o in oracle], [max(o[2], 1e-5) for o in oracle], "k:", marker=".",
                label=label)
  for w in widths:
    pts = sorted((p for p in points if p["width"] == w), key=lambda p: p["rows"])
    label = f"width x{width_label(w)} {tuple(pts[0]['hidden'])}"
    ax.plot([p["rows"] for p in pts], [p["test_auc"] for p in pts], "o-", label=label)
    ax_gap.plot([p["rows"] for p in pts], [max(p["gap"], 1e-5) for p in pts], "o-",
                label=label)
  ax.set_xscale("log")
  ax.set_xlabel("rows generated (train = 80%)")
  ax.set_ylabel("test AUC")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  ax_gap.set_xscale("log")
  ax_gap.set_yscale("log")
  ax_gap.set_xlabel("rows generated")
  ax_gap.set_ylabel("Bayes AUC - test AUC")
  ax_gap.grid(True, which="both", alpha=0.3)
  ax_gap.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                          capture_output=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=DEFAULT_CONFIG, help="a synthetic-data config file")
  p.add_argument("--rows", default=None, help="data sizes, e.g. 1e5,3e5,1e6 (default: "
                 "1e5,3e5,1e6,3e6,1e7; --small: 4e3,4e4)")
  p.add_argument("--widths", default=None, help="layer-size factors, e.g. 0.5,1,2")
  p.add_argument("--small", action="store_true",
                 help="a small world and model at two tiny sizes (CI smoke run)")
  p.add_argument("--out", default=os.path.join(REPO, "runs", "scaling"))
  p.add_argument("--quiet", action="store_true", help="no training log")
  p.add_argument("--only-finished", action="store_true",
                 help="report the points already trained in OUT, train none (e.g. a sweep "
                      "whose largest size ran for one width only)")
  p.add_argument("--no-oracle", action="store_true",
                 help="skip the reference learner told all but the users' own vectors")
  p.add_argument("overrides", nargs="*", help="extra --config.x=y overrides (after --)")
  args = p.parse_args(argv)

  rows = parse_rows(args.rows) if args.rows else list(SMALL_ROWS if args.small else DEFAULT_ROWS)
  widths = (parse_widths(args.widths) if args.widths
            else list(SMALL_WIDTHS if args.small else DEFAULT_WIDTHS))
  overrides = [*(SMALL_OVERRIDES if args.small else ()), *args.overrides]
  os.makedirs(args.out, exist_ok=True)
  points = []
  for width in widths:
    for n in rows:
      config = point_config(args.config, n, width, overrides,
                            SMALL_SIZES if args.small else None)
      workdir = os.path.join(args.out, "runs", f"w{width_label(width)}_r{n}")
      if args.only_finished and not os.path.exists(
          os.path.join(workdir, "scaling_timing.json")):
        print(f"scaling: rows {n:,} width x{width_label(width)}: not trained, skipped")
        continue
      print(f"scaling: rows {n:,} width x{width_label(width)} "
            f"hidden {tuple(layer_sizes(config))} -> {workdir}", flush=True)
      point = {"rows": n, "width": width, "hidden": layer_sizes(config),
               "model": config.model.name, "workdir": workdir,
               **run_point(config, workdir, args.quiet)}
      oracle = None if args.no_oracle else oracle_point(
          config, os.path.join(args.out, f"oracle_r{n}.json"))
      if oracle is not None:
        # The same test rows as the run's, or the reference means nothing: the ceilings agree
        # (to float rounding: the run reads the truth column back from the prepared data).
        if abs(oracle["oracle_bayes_auc"] - point["bayes_auc"]) > 1e-6:
          raise SystemExit(f"user oracle at {n:,} rows: Bayes AUC {oracle['oracle_bayes_auc']}"
                           f" on its test rows, {point['bayes_auc']} on the run's: the splits "
                           "differ (mscenario/data/prepare.py changed?)")
        point["oracle_auc"] = oracle["oracle_auc"]
        point["oracle_gap"] = oracle["oracle_bayes_auc"] - oracle["oracle_auc"]
      print(f"scaling: rows {n:,} width x{width_label(width)}: test AUC "
            f"{point['test_auc']:.4f}  Bayes {point['bayes_auc']:.4f}  gap {point['gap']:.4f}"
            f"  {point['examples_per_sec']:,.0f} ex/s  {point['wall_s']:.0f}s"
            + (f"  (user oracle gap {point['oracle_gap']:.4f})" if "oracle_gap" in point
               else ""), flush=True)
      points.append(point)

  if not points:
    raise SystemExit(f"no finished points in {args.out}/runs")
  model = points[0]["model"]
  title = (f"{model} on the synthetic world ({os.path.basename(args.config)}"
           f"{', small' if args.small else ''}), test AUC vs rows")
  report = {
      "command": " ".join([os.path.basename(sys.executable), "benchmarks/scaling.py",
                           *(argv if argv is not None else sys.argv[1:])]),
      "config": os.path.relpath(args.config, REPO), "overrides": overrides,
      "commit": git_commit(), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
      "points": points,
  }
  with open(os.path.join(args.out, "scaling.json"), "w") as f:
    json.dump(report, f, indent=2)
  table = markdown(points, title)
  with open(os.path.join(args.out, "scaling.md"), "w") as f:
    f.write(table)
  plot(points, os.path.join(args.out, "scaling.png"), title)
  print(table)
  print(f"scaling: wrote {args.out}/scaling.json, scaling.md, scaling.png")
  return report


if __name__ == "__main__":
  main()
