"""The one training loop, used by `train` and `update`: epochs of steps from a batch source,
logging, NaN checks, mid-epoch checkpoints, and an end-of-epoch hook (validation, early
stopping and saving are the caller's).

Two batch sources give the same batches in the same order (tested bit for bit):
  * HostBatches: the host pipeline (numpy gathers from memory-mapped columns, prefetched onto
    the devices), one jitted step per call; for data that does not fit on the devices.
  * DeviceBatches: the columns are uploaded once, replicated on every device; each epoch's
    row order (the same (seed, epoch) permutation the host pipeline draws, ~10 ms of numpy per
    epoch) is uploaded as one [batches, batch] index array split over the 'data' axis, so each
    device gathers its own rows locally: no host round trip and no collective per step. One
    host call runs up to `train.steps_per_call` steps as a `lax.scan`.
Where time goes at these model sizes is per-step host work (DESIGN.md §3); scanning removes it.

Length: the one loop and its two batch sources, which must give the same batches in the
same order (tested bit for bit); keeping them beside the loop keeps that contract in view.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from mscenario import config as config_lib
from mscenario.data import pipeline
from mscenario.errors import ConfigError, MscenarioError
from mscenario.flat import flatten
from mscenario.parallel import mesh as mesh_lib
from mscenario.train import workdir as workdir_lib


class TrainingDiverged(MscenarioError):
  pass


class Preempted(Exception):
  """SIGTERM (how TPU VMs, SLURM and Kubernetes announce preemption) arrived; a checkpoint at
  a step boundary is on disk. Not an MscenarioError: the CLI exits with EXIT_PREEMPTED."""
  EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" (schedulers requeue on it)


class Preemption:
  """Has a preemption been announced? Checked at every call boundary of the loop.

  One process: our own SIGTERM handler sets a flag. Several processes (jax.distributed):
  JAX's preemption service receives the signal and agrees on one sync point for every host
  (`multihost_utils.reached_preemption_sync_point`), called with the loop's call counter,
  which advances identically on every host.
  """

  def __init__(self):
    self.flag = False
    self.calls = 0
    self._previous = None

  def __enter__(self):
    # Not jax.process_count() here: entered before jax.distributed.initialize, which must
    # come before anything initialises the backend. Once JAX's preemption service starts
    # (several processes) it takes SIGTERM over at the OS level.
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame):
    self.flag = True

  def requested(self) -> bool:
    self.calls += 1
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(self.calls)
      except RuntimeError:  # preemption service not enabled in this runtime
        return False
    return self.flag


class Logger:
  """metrics.jsonl + TensorBoard events, written by process 0 only."""

  def __init__(self, wd: workdir_lib.WorkDir, resume_step: int):
    self.active = jax.process_index() == 0
    self.path = wd.file(workdir_lib.METRICS)
    self.tb = None
    if not self.active:
      return
    if wd.exists(workdir_lib.METRICS):  # drop lines past the checkpoint we resume from
      keep = [r for r in wd.read_metrics() if r.get("step", 0) <= resume_step]
      workdir_lib.write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(wd.file("tensorboard"))
    except ImportError:  # optional at runtime; metrics.jsonl is the record
      self.tb = None

  def write(self, record: dict) -> None:
    if not self.active:
      return
    workdir_lib.append_jsonl(self.path, record)
    if self.tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(k, v, record["step"])

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def hparams_of(config) -> dict:
  """model.*, train.* and seed as TensorBoard HParams values, as config.json records them:
  the selected model's subtree only, not every model's defaults."""
  flat = flatten(json.loads(config_lib.to_json(config)), sep=".")
  return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
          for k, v in flat.items() if k.split(".")[0] in ("model", "train", "seed")}


def write_hparams(wd: workdir_lib.WorkDir, config, results: dict) -> None:
  """The run's hyperparameters beside its final metrics in TensorBoard's HParams view, so
  runs of a sweep can be compared there (process 0; skipped without tensorboardX)."""
  if jax.process_index() != 0:
    return
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return
  hparams = hparams_of(config)
  metrics = {"hparams/test_auc": results["overall"]["auc"],
             "hparams/test_logloss": results["overall"]["logloss"],
             "hparams/best_valid_auc": results.get("valid_auc") or float("nan")}
  for name, r in results.get("scenarios", {}).items():
    if isinstance(r.get("auc"), float):
      metrics[f"hparams/test_auc/{name}"] = r["auc"]
  with SummaryWriter(wd.file("tensorboard")) as writer:
    writer.add_hparams(hparams, metrics, name="hparams")


# ---------------------------------------------------------------------------- batch sources
class HostBatches:
  """One step per call on batches built on the host and prefetched onto the devices.

  The step runs through the same gather-then-step program as DeviceBatches (with identity
  rows): XLA compiles a step whose inputs come from an in-program gather slightly
  differently (~1 ulp after a few steps), and one program keeps the sources bit-identical.
  """
  max_steps_per_call = 1

  def __init__(self, setup, it: pipeline.BatchIterator, prefetch: int):
    self.setup, self.it, self.prefetch = setup, it, prefetch
    self.num_batches, self.global_batch_size = it.num_batches, it.global_batch_size
    local = np.arange(it.local_batch_size, dtype=np.int32) + it.process_index * it.local_batch_size
    self._rows = jax.make_array_from_process_local_data(index_sharding(setup.mesh), local[None])
    self._multi = scanned_steps(setup, {k: setup.batch_shardings[k] for k in column_keys(setup)})
    self._zero = jnp.zeros((), jnp.int32)
    self._batches = None

  def start_epoch(self, epoch: int, start: int) -> None:
    sharding = mesh_lib.batch_sharding(self.setup.mesh)
    index_sharding = self._rows.sharding

    def transfer(batch):
      weight = batch.pop("weight")
      return (pipeline.to_global(batch, sharding),
              jax.make_array_from_process_local_data(index_sharding, weight[None]))
    self._batches = pipeline.prefetch(self.it.epoch(epoch, start), transfer, self.prefetch)

  def advance(self, state, n: int):
    assert n == 1
    columns, weight = next(self._batches)
    return self._multi(state, columns, self._rows, weight, self._zero, 1)

  def end_epoch(self) -> None:
    if self._batches is not None:
      self._batches.close()
    self._batches = None


def device_columns_bytes(data, keys) -> int:
  return sum(int(data.arrays[k].nbytes) for k in keys)


def device_columns(setup) -> dict:
  """The prepared columns the model reads, on every device (uploaded once per setup)."""
  if "columns" not in setup.cache:
    rep = mesh_lib.replicated(setup.mesh)
    setup.cache["columns"] = {k: upload_replicated(np.asarray(setup.data.arrays[k]), rep)
                              for k in column_keys(setup)}
  return setup.cache["columns"]


def use_device(setup) -> bool:
  """data.on_device: always, never, or auto = the columns fit data.device_budget_mb."""
  mode = setup.config.data.get("on_device", "auto")
  if mode not in ("auto", "always", "never"):
    raise ConfigError(f"data.on_device={mode!r}: expected auto, always or never")
  if mode != "auto":
    return mode == "always"
  budget = float(setup.config.data.get("device_budget_mb", 1024)) * 2 ** 20
  return device_columns_bytes(setup.data, column_keys(setup)) <= budget


def device_predict(setup, state, it: pipeline.BatchIterator) -> np.ndarray:
  """Probabilities of every batch of `it` (unshuffled, last batch padded) in one call: the
  batches' rows are gathered on the devices from the resident columns."""
  if "eval_rows" not in setup.cache:
    rep = mesh_lib.replicated(setup.mesh)
    eval_fn, shardings = setup.eval_fn, setup.batch_shardings

    def eval_rows(params, model_state, embed, columns, rows):
      return jax.lax.map(
          lambda r: eval_fn(params, model_state, embed, _gather(columns, r, shardings)), rows)

    ss = setup.state_shardings
    setup.cache["eval_rows"] = jax.jit(
        eval_rows, in_shardings=(ss.params, ss.model_state, ss.embed,
                                 {k: rep for k in column_keys(setup)},
                                 index_sharding(setup.mesh)),
        out_shardings=rep)
  rows, _ = it.epoch_rows(0)
  rows = jax.make_array_from_process_local_data(index_sharding(setup.mesh), rows)
  probs = setup.cache["eval_rows"](state.params, state.model_state, state.embed,
                                   device_columns(setup), rows)
  return np.asarray(probs).reshape(-1)


class DeviceBatches:
  """`steps_per_call` steps per call, gathering rows from device-resident columns."""

  def __init__(self, setup, it: pipeline.BatchIterator, steps_per_call: int):
    if steps_per_call < 1:
      raise ConfigError(f"train.steps_per_call={steps_per_call}: expected at least 1")
    self.setup, self.it = setup, it
    self.max_steps_per_call = steps_per_call
    self.num_batches, self.global_batch_size = it.num_batches, it.global_batch_size
    rep = mesh_lib.replicated(setup.mesh)
    self.columns = device_columns(setup)
    self.index_sharding = index_sharding(setup.mesh)
    self._multi = scanned_steps(setup, {k: rep for k in self.columns})
    self._rows = self._weight = None
    self._pos = 0

  def start_epoch(self, epoch: int, start: int) -> None:
    rows, weight = self.it.epoch_rows(epoch)  # this process's share, [num_batches, local]
    self._rows = jax.make_array_from_process_local_data(self.index_sharding, rows)
    self._weight = jax.make_array_from_process_local_data(self.index_sharding, weight)
    self._pos = start

  def advance(self, state, n: int):
    state, metrics = self._multi(state, self.columns, self._rows, self._weight,
                                 jnp.asarray(self._pos, jnp.int32), n)
    self._pos += n
    return state, metrics

  def end_epoch(self) -> None:
    self._rows = self._weight = None


def column_keys(setup) -> list[str]:
  return [k for k in setup.batch_shardings if k != "weight"]


def upload_replicated(array: np.ndarray, sharding) -> jax.Array:
  """A full copy on every device (each process passes the whole array; works multi-host)."""
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def index_sharding(mesh) -> NamedSharding:
  """[batches, batch] row indices: each device holds the rows of its share of every batch."""
  return NamedSharding(mesh, P(None, "data"))


def _gather(columns: dict, rows: jax.Array, shardings: dict) -> dict:
  """One batch's rows of every column, laid out as the step expects (split over 'data')."""
  batch = {k: jnp.take(c, rows, axis=0) for k, c in columns.items()}
  return jax.lax.with_sharding_constraint(batch, {k: shardings[k] for k in batch})


def scanned_steps(setup, column_shardings: dict):
  """jit of (state, columns, rows, weight, start, n) -> n steps from batch `start`, as a
  lax.scan of gather-then-step; both batch sources run this one program."""
  step_fn, shardings = setup.step_fn, setup.batch_shardings

  def multi(state, columns, rows, weight, start, n):
    rows = jax.lax.dynamic_slice_in_dim(rows, start, n, axis=0)
    weight = jax.lax.dynamic_slice_in_dim(weight, start, n, axis=0)

    def body(state, xs):
      r, w = xs
      return step_fn(state, {**_gather(columns, r, shardings),
                             "weight": jax.lax.with_sharding_constraint(w, shardings["weight"])})

    return jax.lax.scan(body, state, (rows, weight))

  idx, rep = index_sharding(setup.mesh), mesh_lib.replicated(setup.mesh)
  return jax.jit(multi, in_shardings=(setup.state_shardings, column_shardings, idx, idx, rep),
                 out_shardings=(setup.state_shardings, rep), static_argnums=5,
                 donate_argnums=0)
  return multi


def make_source(setup, it: pipeline.BatchIterator):
  """DeviceBatches when data.on_device says so (auto: the columns fit the budget)."""
  if use_device(setup):
    return DeviceBatches(setup, it, int(setup.config.train.get("steps_per_call", 32)))
  return HostBatches(setup, it, setup.config.train.prefetch)


# ---------------------------------------------------------------------------- the loop
def _steps(x) -> np.ndarray:
  """A call's metric with a leading steps axis (a one-step call may return a scalar)."""
  x = np.asarray(x)
  return x[None] if x.ndim == 0 else x


def check_finite(losses: np.ndarray, grad_norms: np.ndarray, step: int, epoch: int,
                 ckpts) -> None:
  """A non-finite loss or gradient norm in any step since the last check: stop before the
  state is saved (a finite loss with a non-finite gradient still poisons the update)."""
  bad = ~np.isfinite(losses) | ~np.isfinite(grad_norms)
  if not bad.any():
    return
  value = losses[bad][0] if not np.isfinite(losses[bad][0]) else grad_norms[bad][0]
  what = "loss" if not np.isfinite(losses[bad][0]) else "gradient norm"
  last = ckpts.latest_step() if ckpts is not None else None
  kept = (f"the last good checkpoint (step {last}) is kept in the work dir"
          if last is not None else "no checkpoint had been written yet")
  raise TrainingDiverged(
      f"training diverged: the {what} became {value} by step {step} (epoch {epoch + 1}); "
      f"{kept}. Lower train.learning_rate, enable train.grad_clip_norm, or check the input "
      "for extreme values.")


def _number(x):
  """A metric as JSON: a float, or (vectorised sweeps: one value per replica) a list."""
  x = np.asarray(x, np.float64)
  return float(x) if x.ndim == 0 else [float(v) for v in x]


def _short(x) -> str:
  return " ".join(f"{v:.4f}" for v in np.atleast_1d(x))


class _Pending:
  """Per-step metrics not yet fetched from the devices (fetching syncs the host)."""

  def __init__(self):
    self.metrics, self.first_step = [], None

  def add(self, metrics, first_step: int) -> None:
    if self.first_step is None:
      self.first_step = first_step
    self.metrics.append(metrics)

  def fetch(self):
    got = jax.device_get(self.metrics)
    # [steps] (one run) or [steps, replicas] (a vectorised sweep)
    loss = np.concatenate([_steps(m["loss"]) for m in got]).astype(np.float64)
    gnorm = np.concatenate([_steps(m["grad_norm"]) for m in got]).astype(np.float64)
    # Per-step parts of the loss a step reports besides (e.g. train.aux_rating's 'bce' and
    # 'aux_loss'), logged next to it.
    parts = {k: np.concatenate([_steps(m[k]) for m in got]).astype(np.float64)
             for k in sorted(got[0]) if k not in ("loss", "grad_norm")}
    first = self.first_step
    self.metrics, self.first_step = [], None
    return first, loss, gnorm, parts


def fit(setup, state, progress: dict, source, *, epochs: int, ckpts, logger, meta,
        end_of_epoch=None, stop_after_steps: int = -1, checkpoint_every: int = 0,
        log_every: int = 50, extra_record: dict | None = None, desc: str = "epoch",
        preemption: "Preemption | None" = None):
  """Train from `progress` ({'epoch', 'batch', …}) until `epochs` are done, the hook sets
  progress['stopped'], or `stop_after_steps` is reached. Returns (state, progress);
  progress['finished'] is set when the epochs ran out (or early stopping ended them).

  end_of_epoch(state, progress, step, epoch_loss) runs after progress moved to the next
  epoch: it validates and saves. `meta(progress)` is what checkpoints record.
  preemption: an entered Preemption (the caller's, so a SIGTERM during start-up counts too):
  on SIGTERM, save at the next call boundary and raise Preempted. None: not preemptible
  (SIGTERM keeps its default effect).
  """
  return _fit(setup, state, progress, source, preemption, epochs=epochs, ckpts=ckpts,
              logger=logger, meta=meta, end_of_epoch=end_of_epoch,
              stop_after_steps=stop_after_steps, checkpoint_every=checkpoint_every,
              log_every=log_every, extra_record=extra_record, desc=desc)


def _fit(setup, state, progress, source, preemption, *, epochs, ckpts, logger, meta,
         end_of_epoch, stop_after_steps, checkpoint_every, log_every, extra_record, desc):
  is_main = jax.process_index() == 0
  step = int(np.max(state.step))  # a sweep's replicas step together
  extra = dict(extra_record or {})
  while progress["epoch"] < epochs and not progress.get("stopped"):
    epoch = progress["epoch"]
    source.start_epoch(epoch, progress["batch"])
    bar = tqdm(total=source.num_batches, initial=progress["batch"], disable=not is_main,
               desc=f"{desc} {epoch + 1}/{epochs}", dynamic_ncols=True)
    pending, since_record = _Pending(), []
    t_last, n_last, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
    try:
      while progress["batch"] < source.num_batches:
        n = min(source.max_steps_per_call, source.num_batches - progress["batch"])
        if checkpoint_every:
          n = min(n, checkpoint_every - step % checkpoint_every)
        if stop_after_steps >= 0:
          n = min(n, max(1, stop_after_steps - step))
        state, metrics = source.advance(state, n)
        pending.add(metrics, step + 1)
        step += n
        progress["batch"] += n
        n_last += n * source.global_batch_size
        bar.update(n)
        last = progress["batch"] == source.num_batches
        save = bool(checkpoint_every and step % checkpoint_every == 0 and not last)
        stop = 0 <= stop_after_steps <= step
        preempted = preemption is not None and preemption.requested()
        logged = (step // log_every) > ((step - n) // log_every)
        if not (logged or last or save or stop or preempted):
          continue
        first, losses, gnorms, parts = pending.fetch()
        check_finite(losses, gnorms, step, epoch, ckpts)
        loss_sum, loss_n = loss_sum + losses.sum(axis=0), loss_n + len(losses)
        elapsed = time.perf_counter() - t_last
        eps = n_last / max(elapsed, 1e-9)
        t_last, n_last = time.perf_counter(), 0
        for i, s in enumerate(range(first, step + 1)):
          since_record.append((losses[i], {k: v[i] for k, v in parts.items()}))
          if s % log_every == 0 or (last and s == step):
            record = {"step": s, "epoch": epoch,
                      "loss": _number(np.mean([x for x, _ in since_record], axis=0)),
                      **{k: _number(np.mean([p[k] for _, p in since_record], axis=0))
                         for k in parts},
                      "grad_norm": _number(gnorms[i]), "examples_per_sec": eps, **extra}
            since_record = []
            logger.write(record)
            bar.set_postfix(loss=_short(record["loss"]), ex_s=f"{eps:,.0f}")
        if preempted and last:  # the end-of-epoch checkpoint follows; then stop
          progress["preempted"] = True
        elif save or stop or preempted:
          ckpts.save_latest(step, state, meta(progress))
        if stop:
          return state, progress
        if preempted and not last:
          ckpts.wait()
          raise Preempted(f"preempted (SIGTERM): checkpoint saved at step {step} (epoch "
                          f"{epoch + 1}, batch {progress['batch']}); run the same command "
                          "to resume exactly there")
    finally:
      bar.close()
      source.end_epoch()
    progress["epoch"], progress["batch"] = epoch + 1, 0
    preempted = progress.pop("preempted", False)
    if end_of_epoch is not None:
      end_of_epoch(state, progress, step, _number(loss_sum / max(loss_n, 1)))
    if preempted:
      if end_of_epoch is None:
        ckpts.save_latest(step, state, meta(progress))
      ckpts.wait()
      raise Preempted(f"preempted (SIGTERM): checkpoint saved at step {step} (end of epoch "
                      f"{epoch + 1}); run the same command to resume exactly there")
  progress["finished"] = True
  return state, progress
