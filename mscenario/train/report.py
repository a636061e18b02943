"""Evaluation and the run's report: probabilities for a split (on the devices when the columns
are resident, else streamed), overall and per-scenario metrics, results.json and the plots."""
from __future__ import annotations

import os

import jax
import numpy as np
from tqdm import tqdm

from mscenario.data import pipeline
from mscenario.metrics import evaluate_by_scenario, format_table
from mscenario.metrics import classification as cls_metrics
from mscenario.metrics import plots
from mscenario.parallel import mesh as mesh_lib
from mscenario.train import fit as fit_lib
from mscenario.train import privacy as privacy_lib
from mscenario.train import workdir as workdir_lib
from mscenario.train.state import Setup, round_batch
from mscenario.train.steps import TrainState

def predict(setup: Setup, state: TrainState, split: str, *, desc: str = "") -> np.ndarray:
  """Probabilities for every row of `split`, in the split's row order."""
  cfg = setup.config
  size = round_batch(cfg.train.eval_batch_size, setup.mesh)
  it = pipeline.BatchIterator(setup.data, split, size, seed=0, shuffle=False, drop_last=False,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  n = len(setup.data.splits[split])
  if fit_lib.use_device(setup):
    return fit_lib.device_predict(setup, state, it)[:n]
  sharding = mesh_lib.batch_sharding(setup.mesh)
  out = []
  batches = pipeline.prefetch(it.epoch(0), lambda b: pipeline.to_global(b, sharding),
                              cfg.train.prefetch)
  for batch in tqdm(batches, total=it.num_batches, desc=desc or f"eval {split}", leave=False,
                    disable=jax.process_index() != 0 or it.num_batches < 4):
    out.append(np.asarray(setup.eval_step(state.params, state.model_state, state.embed,
                                          batch)))
  probs = np.concatenate(out)[: len(setup.data.splits[split])]
  return probs


def evaluate_split(setup: Setup, state: TrainState, split: str,
                   probs: np.ndarray | None = None) -> dict:
  """Overall and per-scenario metrics of `split` (probabilities computed unless given)."""
  if probs is None:
    probs = predict(setup, state, split)
  idx = setup.data.splits[split]
  arrays = setup.data.arrays
  truth = np.asarray(arrays["truth"][idx]) if "truth" in arrays else None
  result = evaluate_by_scenario(
      np.asarray(arrays["label"][idx]), probs, np.asarray(arrays["user"][idx]),
      np.asarray(arrays["scenario"][idx]), list(setup.data.schema.scenario_names),
      setup.config.train.threshold, truth=truth)
  return {"split": split, **result}


def cold_item_metrics(setup: Setup, probs: np.ndarray, split: str = "test") -> dict:
  """Metrics (the keys of 'overall') on the rows of held-out items (data.cold_items)."""
  idx = setup.data.splits[split]
  arrays = setup.data.arrays
  m = np.isin(np.asarray(arrays["item"][idx]), setup.data.meta["cold_items"])
  if not m.any():
    return {}
  truth = np.asarray(arrays["truth"][idx])[m] if "truth" in arrays else None
  return evaluate_by_scenario(
      np.asarray(arrays["label"][idx])[m], probs[m], np.asarray(arrays["user"][idx])[m],
      np.asarray(arrays["scenario"][idx])[m], list(setup.data.schema.scenario_names),
      setup.config.train.threshold, truth=truth)["overall"]


def final_report(setup, ckpts, workdir: str, log=print) -> dict:
  """Evaluate the best state on valid and test; write results.json, plots; print the table."""
  restored = ckpts.restore_best(setup.abstract_state)
  if restored is None:
    restored = ckpts.restore_latest(setup.abstract_state)
  state, meta = restored
  probs = predict(setup, state, "test")
  results = evaluate_split(setup, state, "test", probs)
  results["best_epoch"] = meta.get("best_epoch", -1) + 1
  results["valid_auc"] = meta.get("best_auc")
  results["data_fingerprint"] = setup.data.fingerprint
  skipped = setup.data.meta.get("skipped") or {}
  results["skipped_rows"] = skipped
  if setup.data.meta.get("cold_items"):
    results["cold_items"] = cold_item_metrics(setup, probs)
  if setup.privacy is not None:  # every step run counts (later iterates were validated too)
    results["privacy"] = privacy_lib.report(setup.privacy, ckpts.latest_step() or 0)
  if jax.process_index() == 0:
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.RESULTS), results, indent=2,
                           sort_keys=True)
    _plots(setup, probs, workdir)
    log(f"\nTest results ({setup.config.model.name}, best epoch {results['best_epoch']}):")
    log(format_table(results))
    if skipped:
      log(f"skipped input rows: {skipped}")
    if "privacy" in results:
      log(privacy_lib.summary_line(results["privacy"]))
    log(f"results: {os.path.join(workdir, 'results.json')}")
  return results


def _plots(setup, probs, workdir) -> None:
  idx = setup.data.splits["test"]
  labels = np.asarray(setup.data.arrays["label"][idx])
  sc = np.asarray(setup.data.arrays["scenario"][idx])
  curves = {"overall": cls_metrics.roc_curve(labels, probs)[:2]}
  for i, name in enumerate(setup.data.schema.scenario_names):
    m = sc == i
    if m.any():
      curves[name] = cls_metrics.roc_curve(labels[m], probs[m])[:2]
  plots.plot_roc(curves, os.path.join(workdir, "roc.png"))
  plots.plot_training_curves(os.path.join(workdir, "metrics.jsonl"),
                             os.path.join(workdir, "training_curves.png"))
