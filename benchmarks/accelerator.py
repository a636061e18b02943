"""One-command accelerator benchmark (issue 11 §4): training throughput, the 10^8-row sparse
step, and exported-model scoring, written as one JSON and one Markdown table.

  python benchmarks/accelerator.py --out runs/accel               # a GPU/TPU chip, < 8 min
  python benchmarks/accelerator.py --small --out runs/accel-cpu   # any CPU, ~1 min (CI test)

What it measures (every figure is examples/s of the training step including its input, or
predictions/s of the exported scorer):
  1. STAR and MMoE, shipped configs, on ML-1M (`--root`, else the synthetic world at ML-1M's
     size: 1M rows, 6,040 users, 3,706 items): host pipeline at batch 4096, and device-resident
     scanned calls at batches 4096 / 16384 / 65536, in float32 and bfloat16.
  2. The sparse-update step (row-wise Adagrad) with a 10^8-row table (10^5 with --small).
  3. The exported scorer (`mscenario export` artefact, jax.export) at batch 2048.

On the lent H200 (no network there): the image has jax/flax/optax/orbax; carry wheels of
ml-collections, tensorboardX, platformdirs, safetensors, tokenizers (see the device README),
and ML-1M copied into an ignored folder of the repo, e.g. `--root .data/ml-1m`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from loop_throughput import measure  # noqa: E402
from table_size import one as table_step  # noqa: E402

from mscenario.config import MODEL_DEFAULTS, load_config  # noqa: E402
from mscenario.data.prepare import prepare  # noqa: E402

ML1M_LIKE = ["--config.data.synthetic.num_rows=1000000", "--config.data.synthetic.num_users=6040",
             "--config.data.synthetic.num_items=3706"]
SMALL = ["--config.data.synthetic.num_rows=20000", "--config.data.synthetic.num_users=500",
         "--config.data.synthetic.num_items=300"]
SMALL_SIZES = {"hidden": "(32,16)", "aux_hidden": "(8,)", "expert_hidden": "(16,)",
               "tower_hidden": "(8,)"}  # of whichever the model has


def model_config(model: str, root: str, small: bool, extra):
  """The model at its shipped sizes (small: tiny ones) on ML-1M, or on the synthetic world."""
  if small or not root:
    sizes = [f"--config.model.{model}.{k}={v}" for k, v in SMALL_SIZES.items()
             if small and k in MODEL_DEFAULTS[model]]
    return load_config(os.path.join(REPO, "configs", "synthetic.py"),
                       [*(SMALL if small else ML1M_LIKE), f"--config.model.name={model}",
                        *sizes, *extra])
  return load_config(os.path.join(REPO, "configs", f"ml1m_{model}.py"),
                     [f"--config.data.root={root}", *extra])


def training(args) -> list[dict]:
  rows, data = [], {}
  batches = (512,) if args.small else (4096, 16384, 65536)
  for model in ("star", "mmoe"):
    for dtype in ("float32", "bfloat16"):
      for batch in batches:
        config = model_config(model, args.root, args.small,
                              [f"--config.train.batch_size={batch}",
                               f"--config.model.dtype={dtype}"])
        key = json.dumps(config.data.to_dict(), sort_keys=True, default=str)
        if key not in data:
          data[key] = prepare(config, log=lambda *_: None)
        steps = args.steps if batch == batches[0] else max(4, args.steps // 4)
        res = measure(config, data[key], steps, args.repeats, args.steps_per_call,
                      host=batch == batches[0] and dtype == "float32")
        res.update(model=model, dtype=dtype)
        rows.append(res)
        print(f"train {model:>5} {dtype:>8} batch {batch:>6}: device-resident "
              f"{res['device_eps']:>12,.0f} ex/s"
              + (f", host pipeline {res['host_eps']:,.0f}" if res.get("host_eps") else ""),
              flush=True)
  return rows


def sparse_step(args) -> dict:
  rows = 10 ** 5 if args.small else 10 ** 8
  res = table_step(rows, "rowwise_adagrad", 5 if args.small else 20,
                   512 if args.small else 4096, "star")
  print(f"sparse step, {rows:,}-row table: {res['examples_per_sec']:,.0f} ex/s "
        f"({res['step_ms']:.1f} ms/step, state {res['state_gib']:.2f} GiB)", flush=True)
  return res


def scoring(args) -> dict:
  """Train a few steps, export, and time the exported scorer on full batches."""
  from mscenario import api
  from mscenario.serve.predictor import ModelVersion, resolve_version_dir
  with tempfile.TemporaryDirectory(prefix="mscenario-accel-") as tmp:
    config = model_config("star", "", True, ["--config.train.epochs=1"])
    run = api.train(config, os.path.join(tmp, "run"), log=lambda *_: None)
    batch = 2048
    run.export(os.path.join(tmp, "model"), buckets=(batch,), log=lambda *_: None)
    version = ModelVersion(resolve_version_dir(os.path.join(tmp, "model")))
    arrays = version.empty_batch(batch)
    rng = np.random.default_rng(0)
    for k, v in arrays.items():  # random valid ids / values, not all-padding rows
      if v.dtype.kind == "i" and v.size:
        arrays[k] = rng.integers(0, 2, v.shape).astype(v.dtype)
    version.score_arrays(arrays)  # warm
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < (2.0 if args.small else 10.0):
      version.score_arrays(arrays)
      n += batch
    pps = n / (time.perf_counter() - t0)
  print(f"exported scorer, batch {batch}: {pps:,.0f} predictions/s", flush=True)
  return {"batch": batch, "predictions_per_sec": pps}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--root", default="", help="ML-1M directory (else the synthetic world)")
  p.add_argument("--small", action="store_true", help="CPU / CI settings (about a minute)")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--steps-per-call", type=int, default=32)
  p.add_argument("--out", required=True, help="directory for accelerator.json and .md")
  args = p.parse_args()
  if args.small:
    args.steps, args.repeats = min(args.steps, 8), min(args.repeats, 1)
  t0 = time.time()
  report = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
            "devices": jax.device_count(), "small": args.small,
            "data": "ml-1m" if args.root and not args.small else "synthetic"}
  report["training"] = training(args)
  report["sparse_step"] = sparse_step(args)
  report["scoring"] = scoring(args)
  report["seconds"] = time.time() - t0
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "accelerator.json"), "w") as f:
    json.dump(report, f, indent=2)
  lines = [f"Device: {report['device']} ({report['backend']}), data {report['data']}, "
           f"{report['seconds']:.0f} s", "",
           "| model | dtype | batch | host pipeline ex/s | device-resident ex/s |",
           "|---|---|---|---|---|"]
  for r in report["training"]:
    host = f"{r['host_eps']:,.0f}" if r.get("host_eps") else "—"
    lines.append(f"| {r['model']} | {r['dtype']} | {r['batch_size']} | {host} | "
                 f"{r['device_eps']:,.0f} |")
  s = report["sparse_step"]
  lines += ["", f"Sparse step (row-wise Adagrad), {s['rows']:,}-row table: "
                f"{s['examples_per_sec']:,.0f} ex/s, {s['state_gib']:.2f} GiB of state.",
            f"Exported scorer, batch {report['scoring']['batch']}: "
            f"{report['scoring']['predictions_per_sec']:,.0f} predictions/s."]
  with open(os.path.join(args.out, "accelerator.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
