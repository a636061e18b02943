"""`train`: a run from its config to results.json: check the work dir, load the data, build
the state (train/state.py), restore or initialise, the one loop (train/fit.py) with
validation, early stopping and checkpoints, then the report (train/report.py).

Everything that must be identical after a crash lives in the checkpoint (state, PRNG, loop
position, early-stopping record); everything else (timings, progress bars) is derived.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import sys

import flax
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mscenario import config as config_lib
from mscenario.data import pipeline
from mscenario.data.prepare import PreparedData, prepare
from mscenario.errors import ConfigError
from mscenario.flat import flatten
from mscenario.parallel import distributed
from mscenario.parallel import mesh as mesh_lib
from mscenario.text.prepare import prepare_text_tables
from mscenario.train import checkpoint as ckpt_lib
from mscenario.train import fit as fit_lib
from mscenario.train import privacy as privacy_lib
from mscenario.train import workdir as workdir_lib
from mscenario.train.fit import TrainingDiverged  # noqa: F401  (part of this module's API)
from mscenario.train.report import (  # noqa: F401  (re-exported: callers use loop.*)
    cold_item_metrics, evaluate_split, final_report, predict)
from mscenario.train.state import (  # noqa: F401  (re-exported: callers use loop.*)
    Setup, all_params, build, embedding_table, example_batch, opt_state_shardings,
    round_batch)
from mscenario.train.steps import TrainState

# Keys that may change between a run and its resumption (everything else must match).
RESUMABLE_CHANGES = ("train.epochs", "train.stop_after_steps", "train.patience",
                     "train.log_every_steps", "train.checkpoint_every_steps", "data.root",
                     "data.cache_dir", "mesh.data", "mesh.model", "distributed.coordinator",
                     "distributed.num_processes", "distributed.process_id", "train.prefetch",
                     "train.steps_per_call", "data.on_device", "data.device_budget_mb",
                     "data.allow_changed_data")


def versions() -> dict:
  out = {"python": sys.version.split()[0], "platform": platform.platform(),
         "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax, "lib") else "",
         "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
         "orbax-checkpoint": getattr(ocp, "__version__", ""),
         "backend": jax.default_backend(), "devices": jax.device_count(),
         "processes": jax.process_count()}
  try:
    out["mscenario"] = importlib.metadata.version("mscenario")
  except Exception:  # not installed as a distribution (source checkout)
    out["mscenario"] = "source"
  return out


def check_resumable(saved: dict, current: dict) -> None:
  a = flatten(saved, sep=".")
  b = flatten(json.loads(json.dumps(current, default=str)), sep=".")
  # A key added to mscenario after the run started is no change if it has its default.
  defaults = flatten(json.loads(json.dumps(config_lib.base_config().to_dict(), default=str)),
                     sep=".")
  diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                and k not in RESUMABLE_CHANGES
                and not (k not in a and k in defaults and b.get(k) == defaults[k]))
  if diff:
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
    raise ConfigError(f"the work dir holds a run with a different config ({shown}); use a new "
                      "--workdir, or the same config to resume")


def check_same_data(saved: dict, data: PreparedData, config) -> None:
  """Resuming on different data would silently mix two runs; refuse unless asked."""
  if saved.get("fingerprint") == data.fingerprint:
    return
  if config.data.get("allow_changed_data", False):
    print(f"train: warning: the prepared data changed since this run started "
          f"(fingerprint {saved.get('fingerprint')} -> {data.fingerprint}); continuing "
          "because data.allow_changed_data=true", file=sys.stderr)
    return
  raise ConfigError(
      f"the work dir's run was trained on other data: prepared-data fingerprint "
      f"{saved.get('fingerprint')} (from {saved.get('path', '?')}) but the data now gives "
      f"{data.fingerprint} (from {data.path}). The input files or the data config changed. "
      "Use a new --workdir, restore the original data, or pass "
      "--config.data.allow_changed_data=true to continue on the new data deliberately.")


# ---------------------------------------------------------------------------- train
def write_run_info(config, wd: workdir_lib.WorkDir, data: PreparedData) -> None:
  """config / versions / transform / data files, each replaced atomically (process 0)."""
  if jax.process_index() != 0:
    return
  workdir_lib.write_text(wd.file(workdir_lib.CONFIG), config_lib.to_json(config))
  workdir_lib.write_json(wd.file(workdir_lib.VERSIONS), versions(), indent=2)
  # predict needs no data: the fitted transform travels with the run. After `update` it holds
  # grown vocabularies that the checkpoints' rows belong to: keep that one.
  if not (wd.exists(workdir_lib.TRANSFORM)
          and wd.read_json(workdir_lib.TRANSFORM).get("updates")):
    workdir_lib.write_json(wd.file(workdir_lib.TRANSFORM), data.transform.state)
  workdir_lib.write_json(wd.file(workdir_lib.DATA),
                         {"fingerprint": data.fingerprint, "path": data.path, **data.meta},
                         indent=2)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def load_data(config, log=print) -> PreparedData:
  """Process 0 prepares (or finds) the cached dataset; the others then load it."""
  if jax.process_index() == 0:
    data = prepare(config, log=log)
  _sync("mscenario-prepare")
  if jax.process_index() != 0:
    data = prepare(config, log=lambda *_: None)
  return data


def train(config, workdir: str, *, log=print) -> dict:
  """Train (or resume) in `workdir`; returns the test results dict (also results.json).

  SIGTERM (preemption) at any point after start-up: the loop saves at its next step boundary
  (or, once training is done, before the final report) and fit.Preempted is raised."""
  with fit_lib.Preemption() as preemption:
    return _train(config, workdir, preemption, log=log)


@dataclasses.dataclass
class RunParts:
  """One run's pieces between start-up and the loop: what a sweep holds once per replica."""
  config: object
  wd: workdir_lib.WorkDir
  setup: Setup
  train_it: pipeline.BatchIterator
  ckpts: ckpt_lib.Checkpoints
  state: TrainState
  progress: dict
  logger: fit_lib.Logger
  log: object

  def meta(self, p: dict) -> dict:
    return {**p, "config": self.config.to_dict()}

  def end_of_epoch(self, state, p, step, epoch_loss) -> None:
    """Validate; early stopping; best is committed before latest records it."""
    tc, log = self.config.train, self.log
    epoch = p["epoch"] - 1
    result = evaluate_split(self.setup, state, "valid")
    auc = result["overall"]["auc"]
    per_scenario = {f"valid_{m}/{name}": r[m] for name, r in result["scenarios"].items()
                    for m in ("auc", "logloss") if isinstance(r.get(m), float)}
    self.logger.write({"step": step, "epoch": epoch, "valid_auc": auc,
                       "valid_logloss": result["overall"]["logloss"], **per_scenario})
    log(f"epoch {epoch + 1}: valid AUC {auc:.4f}  LogLoss {result['overall']['logloss']:.4f}")
    p["history"].append({"epoch": epoch, "step": step, "valid_auc": auc})
    improved = auc > p["best_auc"]
    if improved:
      p["best_auc"], p["best_epoch"], p["bad_epochs"] = auc, epoch, 0
    else:
      p["bad_epochs"] += 1
      if tc.patience and p["bad_epochs"] >= tc.patience:
        p["stopped"] = True
        log(f"train: early stopping after epoch {epoch + 1} (best epoch "
            f"{p['best_epoch'] + 1}, valid AUC {p['best_auc']:.4f})")
    if improved:
      self.ckpts.save_best(step, state, self.meta(p))
      self.ckpts.best.wait_until_finished()
    self.ckpts.save_latest(step, state, self.meta(p))

  def finish(self) -> dict:
    """The final report (results.json) from the best state, then close the managers."""
    results = final_report(self.setup, self.ckpts, self.wd.path, self.log)
    self.ckpts.close()
    fit_lib.write_hparams(self.wd, self.config, results)
    return results


def open_run(config, workdir: str, mesh, *, log=print) -> RunParts:
  """Check the work dir against `config`, load the data, build the state's program, restore
  the latest checkpoint (or initialise) and open the logger."""
  wd = workdir_lib.WorkDir(workdir)
  os.makedirs(wd.path, exist_ok=True)
  if wd.exists(workdir_lib.CONFIG):
    check_resumable(config_lib.upgrade(wd.read_json(workdir_lib.CONFIG)), config.to_dict())
  if jax.process_index() != 0:
    log = lambda *_: None  # noqa: E731
  data = load_data(config, log)
  text_tables = None
  if config.text.enabled:
    text_tables = prepare_text_tables(config, wd.path, data, log=log)
  if wd.exists(workdir_lib.DATA):
    check_same_data(wd.read_json(workdir_lib.DATA), data, config)
  setup = build(config, data, mesh, text_tables)
  write_run_info(config, wd, data)
  tc = config.train
  batch_size = round_batch(tc.batch_size, mesh)
  if batch_size != tc.batch_size:
    raise ConfigError(f"train.batch_size={tc.batch_size} must be a multiple of the mesh's "
                      f"data axis ({mesh.shape['data']})")
  train_it = (privacy_lib.PoissonBatches(setup.privacy, data, seed=config.seed,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count())
              if setup.privacy else
              pipeline.BatchIterator(data, "train", batch_size, seed=config.seed, shuffle=True,
                                     drop_last=tc.drop_last, process_index=jax.process_index(),
                                     process_count=jax.process_count()))
  ckpts = ckpt_lib.Checkpoints(wd.path, tc.keep_checkpoints)
  restored = ckpts.restore_latest(setup.abstract_state)
  if restored is None:
    state = setup.create_state()
    progress = {"epoch": 0, "batch": 0, "best_auc": -1.0, "best_epoch": -1, "bad_epochs": 0,
                "stopped": False, "history": []}
  else:
    state, progress = restored
    log(f"train: resuming from step {int(state.step)} (epoch {progress['epoch']}, batch "
        f"{progress['batch']}) in {wd.path}")
  logger = fit_lib.Logger(wd, int(state.step))
  return RunParts(config, wd, setup, train_it, ckpts, state, progress, logger, log)


def _train(config, workdir: str, preemption, *, log=print) -> dict:
  distributed.maybe_initialize(config.distributed)
  mesh = mesh_lib.make_mesh(config.mesh)
  run = open_run(config, workdir, mesh, log=log)
  setup, tc, log = run.setup, config.train, run.log
  source = fit_lib.make_source(setup, run.train_it)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(run.state.params))
  where = ("device-resident data, " f"{source.max_steps_per_call} steps/call"
           if isinstance(source, fit_lib.DeviceBatches) else "host input pipeline")
  log(f"train: model {config.model.name} ({n_params:,} parameters), "
      f"{len(setup.data.splits['train']):,} train rows, {run.train_it.num_batches} "
      f"steps/epoch, mesh {dict(mesh.shape)}, {jax.device_count()} "
      f"{jax.default_backend()} device(s), {where}")
  try:
    state, progress = fit_lib.fit(
        setup, run.state, run.progress, source, epochs=tc.epochs, ckpts=run.ckpts,
        logger=run.logger, meta=run.meta, end_of_epoch=run.end_of_epoch,
        stop_after_steps=tc.stop_after_steps, checkpoint_every=tc.checkpoint_every_steps,
        log_every=tc.log_every_steps, preemption=preemption)
  finally:
    run.ckpts.wait()
    run.logger.close()
  if tc.stop_after_steps >= 0 and not progress.get("finished"):
    run.ckpts.close()
    return {}
  if preemption.flag:  # arrived after the last step: training is saved, the report is not
    run.ckpts.close()
    raise fit_lib.Preempted("preempted (SIGTERM) after the last training step (checkpoint "
                            "saved); run the same command to write the final report")
  return run.finish()
