"""`mscenario update`: continue a work dir's latest checkpoint on new events only.

New values of vocabulary features take rows reserved at fit time (`data.reserve_fraction`),
so the embedding table, and with it every checkpoint, keeps its shape: the latest state
(optimizer moments and step included) restores unchanged and the same jitted step trains on.
The grown vocabularies go to the work dir's transform.json only after the new checkpoint is
on disk. An update is keyed by a fingerprint of its events (and epochs/holdout), recorded in
the checkpoint and in transform.json: a rerun after a crash between the two finishes the
update without training again (the growth is deterministic), and a rerun of a finished update
is a no-op. With `--out` the result is exported as a new model version, which a running
server picks up (hot swap).
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from mscenario.errors import ConfigError, MscenarioError

# jax and the training stack are imported inside the functions: the CLI registers this
# command on every invocation and must stay fast to start.


def load_workdir(workdir: str, overrides=()):
  """(config, transform) of a trained work dir, or a clear error why it cannot be updated."""
  from mscenario.train.workdir import CONFIG, TRANSFORM, WorkDir
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
  return config, transform


def read_events(config, path: str):
  """NEW_EVENTS as a RawTable: CSV/Parquet with the canonical columns (as predict reads)."""
  from mscenario.data.sources import load_source
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
                 epochs: int = 1, holdout: float = 0.0, out: str | None = None,
                 buckets=None, keep: int = 5, source: str = "", log=print) -> dict:
  """Grow vocabularies from `table`, train `epochs` over its rows from the latest checkpoint,
  save a checkpoint (latest and best: eval/predict/export then use the updated model) and,
  with `out`, export a new model version. Returns the summary dict."""
  import jax
  from mscenario.data import pipeline
  from mscenario.data.prepare import PreparedData
  from mscenario.parallel import mesh as mesh_lib
  from mscenario.train import checkpoint as ckpt_lib
  from mscenario.train import loop
  from mscenario.train import fit as fit_lib
  from mscenario.train import workdir as workdir_lib
  from mscenario.train.evaluate import _text_tables
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
    return {**done[0], "already_applied": True}
  index = len(transform.state.get("updates", [])) + 1
  growth = transform.grow(table, index)
  arrays, keep_rows, skipped = transform.apply(table, on_error=config.data.on_error)
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
    if committed:  # trained and checkpointed, but transform.json was not written: finish
      log(f"update {index}: the checkpoint already holds these events (a crash came before "
          "the vocabularies were saved); completing without training again")
      return _complete(wd, transform, {**committed[0]["record"], "completed_after_crash": True},
                       out, buckets, keep, t0, log)
    step_from = int(state.step)
    before = loop.evaluate_split(setup, state, "valid")["overall"] if n_hold else None
    batch_size = loop._round_batch(tc.batch_size, mesh)
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
          epochs=epochs, ckpts=ckpts, logger=logger, meta=lambda p: meta,
          end_of_epoch=lambda state, p, step, loss: epoch_loss.append(loss),
          log_every=tc.log_every_steps, extra_record={"update": index},
          desc=f"update {index}: epoch")
    finally:
      logger.close()
    step_to = int(state.step)
    after = loop.evaluate_split(setup, state, "valid")["overall"] if n_hold else None
    record = {"update": index, "source": source, "rows": n, "train_rows": n - n_hold,
              "holdout_rows": n_hold, "epochs": epochs, "step_from": step_from,
              "step_to": step_to, "loss": epoch_loss, "skipped": skipped,
              "growth": growth, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "fingerprint": fingerprint}
    if n_hold:
      record["holdout_auc_before"] = before["auc"]
      record["holdout_auc_after"] = after["auc"]
    new_meta = {**meta, "updates": [*meta.get("updates", []),
                                    {"fingerprint": fingerprint, "record": record,
                                     **{k: record[k] for k in ("update", "rows", "step_from",
                                                               "step_to")}}]}
    ckpts.save_latest(step_to, state, new_meta)
    ckpts.save_best(step_to, state, new_meta)
    ckpts.wait()
  finally:
    ckpts.close()
  return _complete(wd, transform, record, out, buckets, keep, t0, log)


def _complete(wd, transform, record: dict, out, buckets, keep: int, t0: float, log) -> dict:
  """The checkpoint is durable: now the vocabularies its new rows belong to (transform.json,
  replaced atomically, carrying the update's fingerprint), the log, and the export."""
  import jax
  from mscenario.train import workdir as workdir_lib
  transform.state.setdefault("updates", []).append(
      {k: record[k] for k in ("update", "source", "rows", "step_from", "step_to", "time",
                              "fingerprint")})
  if jax.process_index() == 0:
    workdir_lib.write_json(wd.file(workdir_lib.TRANSFORM), transform.state)
    workdir_lib.append_jsonl(wd.file(workdir_lib.UPDATES), record)
  record["seconds"] = time.time() - t0
  _log_summary(record, log)
  if out:
    from mscenario.serve import DEFAULT_BUCKETS
    from mscenario.serve import export as export_lib
    record["export"] = export_lib.export(wd.path, out, buckets=buckets or DEFAULT_BUCKETS,
                                         checkpoint="latest", keep=keep, log=log)
  return record


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


def update(workdir: str, data_path: str, *, overrides=(), **kwargs) -> dict:
  """`mscenario update` on a CSV/Parquet file of new events."""
  workdir = os.path.abspath(workdir)
  config, transform = load_workdir(workdir, overrides)
  table = read_events(config, data_path)
  return update_table(workdir, table, config=config, transform=transform,
                      source=os.path.abspath(data_path), **kwargs)


def cmd_update(args, overrides):
  update(args.workdir, args.data, overrides=overrides, epochs=args.epochs,
         holdout=args.holdout, out=args.out, buckets=args.buckets, keep=args.keep)


def add_cli(subparsers) -> None:
  """Adds `update` to the top-level `mscenario` parser."""
  from mscenario.serve import _buckets
  u = subparsers.add_parser(
      "update", help="continue a work dir's latest checkpoint on new events (vocabularies "
                     "grow into reserved rows) and optionally export a new model version")
  u.add_argument("--workdir", required=True)
  u.add_argument("--data", required=True, help="CSV/Parquet of new events (the columns "
                                               "`mscenario predict` reads, plus the label)")
  u.add_argument("--out", help="model dir: export the updated model as a new version")
  u.add_argument("--epochs", type=int, default=1)
  u.add_argument("--holdout", type=float, default=0.0,
                 help="fraction of the latest new events kept out of training, to report "
                      "AUC before/after the update")
  u.add_argument("--buckets", type=_buckets, default=None,
                 help="export batch sizes, comma-separated (default: as `export`)")
  u.add_argument("--keep", type=int, default=5, help="model versions to keep (0 = all)")
  u.set_defaults(func=cmd_update)
