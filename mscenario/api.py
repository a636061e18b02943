"""The Python API: every CLI command as a function or a method of one `Run` (a work dir).

  import mscenario as ms
  config = ms.load_config("configs/ml100k_star.py", {"train.epochs": 2})
  run = ms.train(config, "runs/star")            # or ms.Run.open("runs/star")
  run.results["overall"]["auc"]                  # results.json
  run.evaluate("valid")                          # metrics dict
  run.predict(frame)                             # DataFrame | dict of columns | CSV/Parquet path
  run.export("models/star")                      # a servable model version
  e = run.explain(rows=2000)                     # attributions per row + per scenario
  params = run.state("best")                     # parameters as a numpy pytree
  ms.update("runs/star", "new_events.csv", out="models/star")   # continue on new events

Nothing here has logic of its own: it names the steps the commands take.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Mapping, Sequence

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mscenario import config as config_lib
from mscenario.errors import MscenarioError
from mscenario.explain import run as explain_lib
from mscenario.explain.run import Explanation
from mscenario.export import writer as export_lib
from mscenario.export.format import DEFAULT_BUCKETS
from mscenario.train import evaluate as evaluate_lib
from mscenario.train import loop
from mscenario.train import sweep as sweep_lib
from mscenario.train import update as update_lib
from mscenario.train import workdir as workdir_lib


def _override_strings(overrides) -> list[str]:
  """--config.a.b=v strings, 'a.b=v' strings, or a mapping {'a.b': value}."""
  if overrides is None:
    return []
  if isinstance(overrides, Mapping):
    return [f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in overrides.items()]
  if isinstance(overrides, str):
    raise TypeError("overrides: pass a list of 'a.b=value' strings or a mapping, not a str")
  return list(overrides)


def load_config(path: str, overrides: Mapping | Sequence[str] | None = None):
  """`configs/NAME.py` with overrides applied (unknown keys are errors)."""
  return config_lib.load_config(path, _override_strings(overrides))


def train(config, workdir: str, *, log=print) -> "Run | list[Run]":
  """Train (or resume) `config` in `workdir`; the finished run. A config with a sweep
  (`sweep.seed=(...)`) trains its replicas as one vectorised program and returns one Run
  per replica (work dirs `workdir/seed=<s>`)."""
  if sweep_lib.sweep_values(config):
    sweep_lib.train(config, workdir, log=log)
    return [_carry_collaborative(Run(os.path.join(workdir, name), c))
            for name, c in sweep_lib.replica_configs(config)]
  loop.train(config, workdir, log=log)
  return _carry_collaborative(Run(workdir, config))


def update(workdir: str, data_path: str, *, overrides=(), epochs: int = 1,
           holdout: float = 0.0, out: str | None = None, buckets: Sequence[int] | None = None,
           keep: int = 5, stop_requested=lambda: False, log=print) -> dict:
  """`mscenario update`: continue the work dir's latest checkpoint on the new events in
  `data_path` (train/update.py), then, with `out`, export the result as a new model version.
  The export runs also after a rerun found the update already applied, so a kill during the
  export is completed by running the same call again (export.writer.export_once)."""
  result = update_lib.update(workdir, data_path, overrides=_override_strings(overrides),
                             epochs=epochs, holdout=holdout, stop_requested=stop_requested,
                             log=log)
  if out:
    result["export"] = export_lib.export_once(result["workdir"], out, step=result["step_to"],
                                              buckets=buckets, keep=keep, log=log)
  return result


def _carry_collaborative(run: "Run") -> "Run":
  """A data.collaborative run keeps its CF state in its work dir from here on (predict,
  export and update read it there; the prepared-data cache may go)."""
  if jax.process_index() == 0 and run.workdir.exists(workdir_lib.TRANSFORM):
    run.workdir.read_collaborative(run.workdir.read_json(workdir_lib.TRANSFORM))
  return run


@contextlib.contextmanager
def _rows_file(rows, what: str):
  """A CSV/Parquet path for raw rows given as a path, a pandas DataFrame or a dict of
  columns (the latter two written to a temporary Parquet file)."""
  if isinstance(rows, (str, os.PathLike)):
    yield os.fspath(rows)
    return
  if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas DataFrame
    table = pa.Table.from_pandas(rows, preserve_index=False)
  elif isinstance(rows, Mapping):
    table = pa.table({k: list(v) if not isinstance(v, np.ndarray) else v
                      for k, v in rows.items()})
  else:
    raise TypeError(f"{what}: expected a DataFrame, a dict of columns or a path, not "
                    f"{type(rows).__name__}")
  with tempfile.TemporaryDirectory(prefix="mscenario-rows-") as tmp:
    path = os.path.join(tmp, "rows.parquet")
    pq.write_table(table, path)
    yield path


class Run:
  """A training run's work dir: its config, results, checkpoints and what can be done with
  them. Open an existing one with `Run.open(workdir)`."""

  def __init__(self, workdir: str, config=None):
    self.workdir = workdir_lib.WorkDir(workdir)
    self.config = config if config is not None else self.workdir.read_config()

  @classmethod
  def open(cls, workdir: str, overrides: Mapping | Sequence[str] | None = None) -> "Run":
    wd = workdir_lib.WorkDir(workdir)
    if not os.path.isdir(wd.path):
      raise MscenarioError(f"{wd.path}: no such work dir")
    return cls(workdir, wd.read_config(_override_strings(overrides)))

  @property
  def path(self) -> str:
    return self.workdir.path

  @property
  def results(self) -> dict | None:
    """The test results the run wrote when it finished (None while it has not)."""
    if not self.workdir.exists(workdir_lib.RESULTS):
      return None
    return self.workdir.read_json(workdir_lib.RESULTS)

  @property
  def metrics(self) -> list[dict]:
    """The records of metrics.jsonl (training loss, validation AUC per epoch, …)."""
    return self.workdir.read_metrics()

  def evaluate(self, split: str = "test", *, checkpoint: str = "best") -> dict:
    """Overall and per-scenario metrics of the best (or latest) checkpoint on `split`."""
    if split not in ("train", "valid", "test"):
      raise MscenarioError(f"split={split!r}: expected train, valid or test")
    return evaluate_lib.evaluate_workdir(self.config, self.path, split, report=False,
                                         checkpoint=checkpoint)

  def predict(self, rows, *, checkpoint: str = "best") -> np.ndarray:
    """Click probabilities for raw rows: a pandas DataFrame, a dict of equally long columns,
    or a CSV/Parquet path. Columns are the data's raw fields (as in the training files);
    unknown ids score as OOV, new items from their text. Rows the input policy skips
    (data.on_error=skip) are left out; the default policy raises naming the row.
    checkpoint="latest" scores with the latest state, e.g. after an update that was not
    promoted to best/ (see `update`)."""
    with _rows_file(rows, "rows") as path:
      return evaluate_lib.score_file(self.config, self.path, path, checkpoint).probs

  def explain(self, split: str = "test", rows: int = 2000, input=None, out: str | None = None,
              *, steps: int | None = None, batch_size: int = 256,
              log=print) -> Explanation:
    """What `mscenario explain` computes: integrated-gradients attributions of the logit per
    row and feature (`.attributions`, `.columns()`), their mean |attribution| per scenario
    (`.table`), model internals (`.summary`, explain.json's content). Explains a seeded
    sample of `rows` rows (0 = all) of `split`, or of `input` (raw rows as `predict` takes
    them). explain.json, attributions.csv and the PNGs go to `out` (default: the work
    dir)."""
    rows_file = contextlib.nullcontext() if input is None else _rows_file(input, "input")
    with rows_file as path:
      return explain_lib.explain(self.path, split, rows, path, out, steps, batch_size,
                                 config=self.config, log=log)

  def export(self, out_dir: str, *, buckets: Sequence[int] | None = None,
             checkpoint: str = "best", keep: int = 5, log=print) -> str:
    """A new servable version in `out_dir` (what `mscenario serve` loads); its path."""
    return export_lib.export(self.path, out_dir, buckets=tuple(buckets or DEFAULT_BUCKETS),
                             checkpoint=checkpoint, keep=keep, log=log)

  def state(self, which: str = "best") -> dict:
    """Trainable parameters (embedding table included) of the best or latest checkpoint,
    as a pytree of numpy arrays."""
    _, _, _, state, _ = export_lib.restore(self.path, which)
    return jax.tree_util.tree_map(np.asarray, loop.all_params(state))

  def __repr__(self) -> str:
    auc = (self.results or {}).get("overall", {}).get("auc")
    shown = f", test AUC {auc:.4f}" if isinstance(auc, float) else ""
    return f"Run({self.path!r}, model={self.config.model.name!r}{shown})"


__all__ = ["load_config", "train", "Run", "Explanation"]
