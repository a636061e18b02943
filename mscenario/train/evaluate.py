"""Evaluation and prediction from a finished (or running) work dir."""
from __future__ import annotations

import csv
import dataclasses
import os

import jax
import numpy as np

from mscenario.data import collaborative
from mscenario.data.prepare import PreparedData
from mscenario.data import sources
from mscenario.errors import MscenarioError
from mscenario.metrics import format_table
from mscenario.parallel import mesh as mesh_lib
from mscenario.text.prepare import with_item_vectors
from mscenario.text.tables import load_text_tables, new_item_text_vectors
from mscenario.train import loop
from mscenario.train import workdir as workdir_lib


def _restore(setup, workdir: str, checkpoint: str = "best"):
  """The work dir's `checkpoint`: "best" (the validated model; the latest when the run has
  no best yet) or "latest" (e.g. after an update that was not promoted)."""
  if checkpoint not in ("best", "latest"):
    raise MscenarioError(f"checkpoint={checkpoint!r}: expected 'best' or 'latest'")
  return workdir_lib.WorkDir(workdir).restore(setup.abstract_state, checkpoint,
                                              setup.config.train.keep_checkpoints)[0]


def _text_tables(config, workdir: str, data):
  """The text tables the run was trained with (<workdir>/text), when text is enabled."""
  if not config.text.enabled:
    return None
  return with_item_vectors(config, load_text_tables(workdir), data.transform.state,
                           data.schema.item_vocab_size)


def require_raw_rows_scorable(config, what: str) -> None:
  """Raw input rows (predict, explain --input) carry no behaviour history: a row's history is
  built from the run's whole event log in data preparation (data/history.py), which input
  rows are not part of. Say so instead of failing inside the model restore."""
  length = int(config.data.get("history", {}).get("length", 0) or 0)
  if length > 0:
    raise MscenarioError(
        f"{what}: this run's model reads behaviour histories (data.history.length={length}), "
        "which are built from the run's event log in data preparation, not from raw input "
        "rows; scoring raw rows is not supported for such models yet. Evaluate its splits "
        "with `mscenario eval` / `mscenario explain --split`, or train without "
        "data.history for a model that scores raw rows")


def evaluate_workdir(config, workdir: str, split: str = "test", *, report: bool = True,
                     checkpoint: str = "best") -> dict:
  """Metrics of the best (or latest) checkpoint on `split`; with `report`, also
  eval_<split>.json (eval_<split>_latest.json) and the printed table (`mscenario eval`)."""
  data = loop.load_data(config, log=print if report else (lambda *_: None))
  setup = loop.build(config, data, mesh_lib.make_mesh(config.mesh),
                     _text_tables(config, workdir, data))
  state = _restore(setup, workdir, checkpoint)
  results = loop.evaluate_split(setup, state, split)
  if report and jax.process_index() == 0:
    name = f"eval_{split}.json" if checkpoint == "best" else f"eval_{split}_{checkpoint}.json"
    workdir_lib.write_json(os.path.join(workdir, name), results, indent=2, sort_keys=True)
    print(format_table(results))
  return results


@dataclasses.dataclass
class Scores:
  """Probabilities for the scored rows of an input file, with where each row came from."""
  probs: np.ndarray       # [n] float32
  lines: np.ndarray       # [n] 1-based input line of each scored row
  scenarios: list         # [n] scenario name of each row
  skipped: dict           # reason -> rows not scored (data.on_error=skip)


def score_file(config, workdir: str, input_path: str, checkpoint: str = "best") -> Scores:
  """Score a CSV/Parquet file of raw rows with the work dir's best (or latest) model.

  The fitted transform saved in the work dir maps raw values to ids (unknown ids -> OOV), so
  neither the training data nor its cache is needed; items new to the model are scored from
  their own text when the run has text features.
  """
  require_raw_rows_scorable(config, f"predict {input_path}")
  transform = workdir_lib.WorkDir(workdir).read_transform()
  cfg = config.copy_and_resolve_references()
  cfg.data.source = "table"
  # --input is relative to the current directory, never to the run's data.root.
  cfg.data.table.train, cfg.data.table.valid, cfg.data.table.test = (
      os.path.abspath(os.path.expanduser(input_path)), "", "")
  table = sources.load_source(cfg.data)  # via the module: tests replace it
  add_cf_columns(workdir, transform, table)
  arrays, keep, skipped = transform.apply(table, on_error=cfg.data.on_error,
                                          require_label=False)
  n = len(arrays["label"])
  if n == 0:
    raise MscenarioError(f"{input_path}: no rows to score")
  if cfg.text.enabled and cfg.text.get("fusion", "concat") != "none":
    fresh = new_item_text_vectors(cfg, workdir, table.columns, arrays["item"],
                                  np.flatnonzero(keep))
    if fresh is not None:
      arrays["item_text"], arrays["item_text_mask"] = fresh
  data = PreparedData(path="", arrays=arrays, splits={"predict": np.arange(n)},
                      transform=transform, meta={"fingerprint": "", "skipped": skipped})
  setup = loop.build(cfg, data, mesh_lib.make_mesh(cfg.mesh),
                     _text_tables(cfg, workdir, data))
  state = _restore(setup, workdir, checkpoint)
  probs = loop.predict(setup, state, "predict")
  names = transform.schema.scenario_names
  return Scores(probs, np.asarray(table.row_line)[keep],
                [names[s] for s in arrays["scenario"].tolist()], skipped)


def add_cf_columns(workdir: str, transform, table):
  """data.collaborative runs: the cf_* columns of raw rows from the run's CF state (as data
  preparation computed them for test rows; any given in the input are replaced). Returns the
  state (None for other runs)."""
  model = workdir_lib.WorkDir(workdir).read_collaborative(transform.state)
  if model is not None:
    collaborative.add_columns(model, table, transform.state["user_field"],
                              transform.state["item_field"])
  return model


def refresh_cf(workdir: str, model, table, keep, labels, transform, tag: str, log=print):
  """`update`: the run's CF state refitted with the kept rows of `table` (their feedback:
  the raw label field, else `labels`), written atomically; a no-op for a state that already
  holds `tag`'s events and for runs without data.collaborative."""
  if model is None:
    return
  values = collaborative.feedback(table, keep, transform.state["label"]["field"], labels)
  new = collaborative.refit(model, table, keep, values, transform.state["user_field"],
                            transform.state["item_field"], tag, log=log)
  if new is not model and jax.process_index() == 0:
    workdir_lib.WorkDir(workdir).write_collaborative(new)


def predict_file(config, workdir: str, input_path: str, output_path: str,
                 checkpoint: str = "best") -> np.ndarray:
  """`mscenario predict`: score_file, written as CSV (line, scenario, probability)."""
  scores = score_file(config, workdir, input_path, checkpoint)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["line", "scenario", "probability"])
      for line, s, p in zip(scores.lines.tolist(), scores.scenarios, scores.probs.tolist()):
        w.writerow([line, s, f"{p:.6f}"])
    msg = f"predict: wrote {len(scores.probs):,} probabilities to {output_path}"
    if scores.skipped:
      msg += f" (skipped rows: {scores.skipped})"
    print(msg)
  return scores.probs
