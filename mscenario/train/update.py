"""`mscenario update`: continue a work dir's latest checkpoint on new events only.

New values of vocabulary features take rows reserved at fit time (`data.reserve_fraction`),
so the embedding table, and with it every checkpoint, keeps its shape: the latest state
(optimizer moments and step included) restores unchanged and the same jitted step trains on.

Two lineages. `ckpt/` (latest) is the one line of training: `train` resumes from it and
`update` continues it, in any order (train after update continues the updated model; an
update after a train or another update continues whatever is latest). `best/` is the
validated model: `train` writes it when validation AUC improves, and an update replaces it
only when promoted: run with `--holdout`, and its holdout AUC beats the best/ model's on the
same holdout rows. So `eval`, `predict` and `export` (default `--checkpoint best`) keep the
validated model; `update --out` and `export --checkpoint latest` export the updated one.

One update is all or nothing, keyed by a fingerprint of its events (and epochs/holdout):
nothing is saved while it trains (a kill or SIGTERM there leaves the work dir as it was; the
rerun trains again, deterministically); the trained state is committed in one latest
checkpoint that records the update; then (promoted only) best/, the refitted CF state
(data.collaborative runs; the new rows' cf_* came from the state before them), updates.jsonl
and last transform.json with the grown vocabularies, each replaced atomically. A rerun after a kill
between them completes without training again; a rerun of a finished update is a no-op that
still completes a killed export (`--out`, done by the API after the update:
`export.writer.export_once`), which a running server then picks up (hot swap).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Callable

import jax
import numpy as np

from mscenario.data import pipeline
from mscenario.data.prepare import PreparedData, raw_feedback, wants_feedback
from mscenario.data.sources import load_source
from mscenario.errors import ConfigError, MscenarioError
from mscenario.metrics.plots import read_jsonl
from mscenario.parallel import mesh as mesh_lib
from mscenario.train import checkpoint as ckpt_lib
from mscenario.train import fit as fit_lib
from mscenario.train import loop
from mscenario.train import workdir as workdir_lib
from mscenario.train.evaluate import _text_tables, add_cf_columns, refresh_cf
from mscenario.train.workdir import CONFIG, TRANSFORM, WorkDir


def load_workdir(workdir: str, overrides=()):
  """(config, transform) of a trained work dir, or a clear error why it cannot be updated."""
  wd = WorkDir(workdir)
  wd.require(CONFIG, TRANSFORM)
  if not wd.has_checkpoint():
    raise MscenarioError(f"{workdir} holds no checkpoint yet: `mscenario update` continues "
                         "a trained model; train first with `mscenario train --config ... "
                         f"--workdir {workdir}`")
  config, transform = wd.read_config(overrides), wd.read_transform()
  if int(config.data.get("history", {}).get("length", 0) or 0) > 0:
    raise ConfigError("`mscenario update` does not support behaviour histories "
                      "(data.history.length > 0) yet")
  if config.get("privacy", {}).get("enabled", False):
    raise ConfigError("`mscenario update` does not support differentially private runs "
                      "(privacy.enabled): its batches are not Poisson-sampled and its steps "
                      "are not accounted; retrain privately instead")
  return config, transform


def read_events(config, path: str):
  """NEW_EVENTS as a RawTable: CSV/Parquet with the canonical columns (as predict reads)."""
  # --data is relative to the current directory, never to the run's data.root.
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise MscenarioError(f"{path}: no such file")
  cfg = config.copy_and_resolve_references()
  cfg.data.source = "table"
  cfg.data.table.train, cfg.data.table.valid, cfg.data.table.test = path, "", ""
  return load_source(cfg.data)


def events_fingerprint(table, epochs: int, holdout: float) -> str:
  """Of the new events' content and how they are trained on (not of where they came from)."""
  h = hashlib.blake2b(digest_size=16)
  h.update(f"epochs={epochs};holdout={holdout};rows={table.num_rows}".encode())
  for name in sorted(table.columns):
    col = np.asarray(table.columns[name])
    h.update(name.encode())
    if col.dtype == object:
      h.update("\x1f".join("\x1e" if v is None else str(v) for v in col.tolist()).encode())
    else:
      h.update(str(col.dtype).encode())
      h.update(np.ascontiguousarray(col).tobytes())
  return h.hexdigest()


def update_table(workdir: str, table, *, config=None, transform=None,
                 epochs: int = 1, holdout: float = 0.0, source: str = "", log=print,
                 preemption=None) -> dict:
  """Grow vocabularies from `table`, train `epochs` over its rows from the latest checkpoint
  and save the result as the latest checkpoint (`best/` only when promoted, see the module
  docstring); or complete a commit a kill interrupted; or nothing (already applied).
  Returns the summary dict.

  preemption: an entered fit.Preemption; on SIGTERM the training stops at the next step
  boundary without saving and fit.Preempted is raised (the update is all or nothing)."""
  wd = workdir_lib.WorkDir(workdir)
  workdir = wd.path
  if config is None or transform is None:
    config, transform = load_workdir(workdir)
  if epochs < 1:
    raise ConfigError(f"--epochs={epochs}: expected at least 1")
  if not 0.0 <= holdout < 1.0:
    raise ConfigError(f"--holdout={holdout}: expected a fraction in [0, 1)")
  t0 = time.time()
  fingerprint = events_fingerprint(table, epochs, holdout)
  done = [u for u in transform.state.get("updates", []) if u.get("fingerprint") == fingerprint]
  if done:
    log(f"update {done[0]['update']}: these events were already applied (steps "
        f"{done[0]['step_from']} -> {done[0]['step_to']}); nothing to do")
    return {**done[0], "already_applied": True, "workdir": workdir}
  index = len(transform.state.get("updates", [])) + 1
  growth = transform.grow(table, index)
  cf_state = add_cf_columns(workdir, transform, table)  # cf_* from the state before the events
  arrays, keep_rows, skipped = transform.apply(table, on_error=config.data.on_error)
  if wants_feedback(config):  # train.aux_rating: the events' raw label values (their stars)
    arrays["feedback"] = raw_feedback(table, keep_rows, config.data.label.field,
                                      need_levels=False)
  n = len(arrays["label"])
  if n == 0:
    raise MscenarioError(f"{source or 'the new events'}: no rows to train on"
                         + (f" (skipped: {skipped})" if skipped else ""))
  # Holdout = the latest rows (by time when the events carry it): "does the update help on
  # what comes next", not a random sample of the same period.
  tfield = config.data.time_field
  if tfield in table.columns:
    order = np.argsort(np.asarray(table.columns[tfield], np.float64)[keep_rows], kind="stable")
  else:
    order = np.arange(n)
  n_hold = int(round(holdout * n))
  if holdout and (n_hold == 0 or n_hold == n):
    raise ConfigError(f"--holdout={holdout} of {n} rows leaves an empty split")
  splits = {"train": np.sort(order[: n - n_hold]), "valid": np.sort(order[n - n_hold:])}
  data = PreparedData(path="", arrays=arrays, splits=splits, transform=transform,
                      meta={"fingerprint": "", "skipped": skipped})
  mesh = mesh_lib.make_mesh(config.mesh)
  setup = loop.build(config, data, mesh, _text_tables(config, workdir, data))
  tc = config.train
  ckpts = ckpt_lib.Checkpoints(workdir, tc.keep_checkpoints)
  try:
    restored = ckpts.restore_latest(setup.abstract_state)
    if restored is None:  # raced with a deletion since load_workdir
      raise MscenarioError(f"{workdir} holds no checkpoint")
    state, meta = restored
    committed = [u for u in meta.get("updates", []) if u.get("fingerprint") == fingerprint]
    if committed:  # trained and checkpointed, then killed before transform.json: finish
      record = committed[0]["record"]
      log(f"update {index}: the latest checkpoint already holds these events (the last "
          "attempt was stopped before it finished); completing without training again")
      if record.get("promoted"):
        ckpts.save_best(record["step_to"], state, meta)
        ckpts.wait()
    else:
      record, new_meta, state = _train_update(
          setup, state, meta, ckpts, wd, data, index=index, epochs=epochs, n_hold=n_hold,
          fingerprint=fingerprint, preemption=preemption, log=log)
      record.update(source=source, rows=n, skipped=skipped, growth=growth)
      new_meta["updates"][-1]["record"] = record
      # One commit: the latest checkpoint records the update (the rerun's test above). best/
      # (the validated model) follows only for a promoted update, after that commit.
      ckpts.save_latest(record["step_to"], state, new_meta)
      ckpts.latest.wait_until_finished()
      if record["promoted"]:
        ckpts.save_best(record["step_to"], state, new_meta)
      ckpts.wait()
  finally:
    ckpts.close()
  # The CF state now holds these events too (refit; a no-op when a killed attempt wrote it).
  refresh_cf(workdir, cf_state, table, keep_rows, arrays["label"], transform, fingerprint, log)
  result = {**_complete(wd, transform, record, t0, log), "workdir": workdir}
  if committed:
    result["completed_after_crash"] = True
  return result


def _train_update(setup, state, meta, ckpts, wd, data, *, index, epochs, n_hold,
                  fingerprint, preemption, log):
  """Train the update's epochs; returns (record, meta to commit, state). Nothing is saved
  here: the caller commits the result in one checkpoint."""
  config, mesh = setup.config, setup.mesh
  tc = config.train
  step_from = int(state.step)
  before = loop.evaluate_split(setup, state, "valid")["overall"] if n_hold else None
  best_auc = None
  if n_hold:  # the validated model (best/) on the same holdout: is the update better?
    best = ckpts.restore_best(setup.abstract_state)
    if best is not None:
      best_auc = loop.evaluate_split(setup, best[0], "valid")["overall"]["auc"]
      del best
  batch_size = loop.round_batch(tc.batch_size, mesh)
  # drop_last=False: every new event is seen (the short last batch is padded with
  # weight-0 rows, which the loss ignores); the seed differs per update.
  it = pipeline.BatchIterator(data, "train", batch_size, seed=config.seed + 7919 * index,
                              shuffle=True, drop_last=False,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  logger = fit_lib.Logger(wd, step_from)
  epoch_loss = []
  try:
    state, _ = fit_lib.fit(
        setup, state, {"epoch": 0, "batch": 0}, fit_lib.make_source(setup, it),
        epochs=epochs, ckpts=_NoSaves(ckpts), logger=logger, meta=lambda p: meta,
        end_of_epoch=lambda state, p, step, loss: epoch_loss.append(loss),
        log_every=tc.log_every_steps, extra_record={"update": index},
        desc=f"update {index}: epoch", preemption=preemption)
  except fit_lib.Preempted:
    raise fit_lib.Preempted(
        f"preempted (SIGTERM) during update {index}: stopped before its checkpoint, nothing "
        f"was saved (the work dir still holds the model of step {step_from}); run the same "
        "command to redo the update") from None
  finally:
    logger.close()
  step_to = int(state.step)
  after = loop.evaluate_split(setup, state, "valid")["overall"] if n_hold else None
  record = {"update": index, "source": "", "rows": len(data.arrays["label"]),
            "train_rows": len(data.splits["train"]), "holdout_rows": n_hold,
            "epochs": epochs, "step_from": step_from, "step_to": step_to, "loss": epoch_loss,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "fingerprint": fingerprint,
            "promoted": False}
  if n_hold:
    record["holdout_auc_before"] = before["auc"]
    record["holdout_auc_after"] = after["auc"]
    record["holdout_auc_best"] = best_auc
    # Promoted: validated on the holdout and better there than the validated model (or
    # there is no validated model yet). Without a holdout an update is never promoted.
    record["promoted"] = bool(best_auc is None or after["auc"] > best_auc)
  new_meta = {**meta, "updates": [*meta.get("updates", []),
                                  {"fingerprint": fingerprint, "record": record,
                                   **{k: record[k] for k in ("update", "rows", "step_from",
                                                             "step_to")}}]}
  return record, new_meta, state


class _NoSaves:
  """The update's view of the checkpoints inside the training loop: the loop's own saves
  (a preemption's) do nothing, so a stopped update leaves the latest checkpoint as it was."""

  def __init__(self, ckpts):
    self._ckpts = ckpts

  def save_latest(self, step, state, meta) -> None:
    pass

  def wait(self) -> None:
    pass

  def latest_step(self):
    return self._ckpts.latest_step()


def _complete(wd, transform, record: dict, t0: float, log) -> dict:
  """The checkpoint is durable: now the update log and the vocabularies its new rows belong
  to. Both are replaced atomically and rewriting them is idempotent; transform.json (which
  carries the update's fingerprint) goes last: once it is written the update is done."""

  if jax.process_index() == 0:
    path = wd.file(workdir_lib.UPDATES)
    kept = [r for r in (read_jsonl(path) if os.path.exists(path) else [])
            if r.get("update") != record["update"]]
    workdir_lib.write_text(path, "".join(json.dumps(r) + "\n" for r in [*kept, record]))
    transform.state.setdefault("updates", []).append(
        {k: record[k] for k in ("update", "source", "rows", "step_from", "step_to", "time",
                                "fingerprint", "promoted")})
    workdir_lib.write_json(wd.file(workdir_lib.TRANSFORM), transform.state)
  result = {**record, "seconds": time.time() - t0}
  _log_summary(result, log)
  return result


def _log_summary(r: dict, log) -> None:
  loss = " -> ".join(f"{x:.4f}" for x in r["loss"])
  log(f"update {r['update']}: {r['train_rows']:,} rows, {r['epochs']} epoch(s), steps "
      f"{r['step_from']} -> {r['step_to']}, loss {loss} ({r['seconds']:.1f}s)")
  if "holdout_auc_before" in r:
    log(f"update {r['update']}: holdout ({r['holdout_rows']:,} latest rows) AUC "
        f"{r['holdout_auc_before']:.4f} before -> {r['holdout_auc_after']:.4f} after")
  if r["skipped"]:
    log(f"update {r['update']}: skipped rows: {r['skipped']}")
  if not r["growth"]:
    log(f"update {r['update']}: no vocabulary growth (no new values, or no reserve: "
        "data.reserve_fraction)")
  for g in r["growth"]:
    oov = (f", {g['oov_values']} value(s) / {g['oov_rows']} row(s) left OOV (reserve "
           "exhausted)" if g["oov_values"] else "")
    log(f"update {r['update']}: {g['feature']}: +{g['added']} value(s), {g['reserve_left']} "
        f"reserved row(s) left{oov}")


def update(workdir: str, data_path: str, *, overrides=(),
           stop_requested: Callable[[], bool] = lambda: False, **kwargs) -> dict:
  """`mscenario update` on a CSV/Parquet file of new events. SIGTERM (preemption) before
  training or during it stops the update with nothing saved (fit.Preempted, exit 75): at once
  during start-up, at the next step boundary in training; once the trained update is being
  committed, the commit finishes first. `stop_requested`: whether the caller saw a SIGTERM
  before this call took the signal over (the CLI notes one while it imports)."""
  with fit_lib.Preemption() as preemption:
    def stop_if_preempted():
      if preemption.flag or stop_requested():
        raise fit_lib.Preempted("preempted (SIGTERM) while `update` was starting: nothing "
                                "was written; run the same command to update")
    stop_if_preempted()
    workdir = os.path.abspath(workdir)
    config, transform = load_workdir(workdir, overrides)
    table = read_events(config, data_path)
    stop_if_preempted()
    result = update_table(workdir, table, config=config, transform=transform,
                          source=os.path.abspath(data_path), preemption=preemption, **kwargs)
    if preemption.flag:
      print(f"update {result['update']}: SIGTERM arrived while the update was being "
            "committed; it completed first", file=sys.stderr)
    return result
