"""`mscenario explain`: a work dir's best checkpoint -> attributions, model internals,
explain.json, a per-row CSV and heatmap PNGs."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from mscenario.data.sources import load_source
from mscenario.errors import MscenarioError
from mscenario.explain import integrated, neighbours, report
from mscenario.explain.attribute import Explainer
from mscenario.parallel import mesh as mesh_lib
from mscenario.text.tables import new_item_text_vectors
from mscenario.train import loop
from mscenario.train.evaluate import _text_tables, require_raw_rows_scorable
from mscenario.train.workdir import CONFIG, WorkDir


@dataclasses.dataclass
class Run:
  config: object
  data: object
  setup: object
  state: object
  text_tables: dict | None = None


def load_run(workdir: str, overrides=(), log=print, config=None) -> Run:
  """Config (the work dir's, or `config` as given), prepared data, built setup and best
  state of a work dir (evaluate_workdir's pattern)."""
  wd = WorkDir(workdir)
  wd.require(CONFIG)
  config = wd.read_config(overrides) if config is None else config
  data = loop.load_data(config, log=log)
  tables = _text_tables(config, workdir, data)
  setup = loop.build(config, data, mesh_lib.make_mesh(config.mesh), tables)
  state = wd.restore(setup.abstract_state, "best", config.train.keep_checkpoints)[0]
  return Run(config, data, setup, state, tables)


def _sample(idx: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
  """A seeded sample of `rows` of `idx` in their original order (all when rows <= 0)."""
  if rows <= 0 or rows >= len(idx):
    return np.asarray(idx)
  pick = np.sort(np.random.default_rng(seed).choice(len(idx), rows, replace=False))
  return np.asarray(idx)[pick]


def _input_rows(run: Run, workdir: str, input_path: str):
  """(arrays, line numbers) of a CSV/Parquet file of raw rows, through the run's transform
  (predict's path: unknown values -> OOV; no label needed; items new to a text-fused model
  get their text vector from their raw fields, as `predict` scores them)."""
  if not os.path.isfile(input_path):
    raise MscenarioError(f"--input {input_path}: no such file")
  require_raw_rows_scorable(run.config, f"explain --input {input_path}")
  cfg = run.config.copy_and_resolve_references()
  cfg.data.source = "table"
  cfg.data.table.train, cfg.data.table.valid, cfg.data.table.test = input_path, "", ""
  table = load_source(cfg.data)
  transform = WorkDir(workdir).read_transform()
  arrays, keep, _ = transform.apply(table, on_error=cfg.data.on_error, require_label=False)
  if len(arrays["label"]) == 0:
    raise MscenarioError(f"--input {input_path}: no rows to explain")
  if cfg.text.get("enabled", False) and cfg.text.get("fusion", "concat") != "none":
    fresh = new_item_text_vectors(cfg, workdir, table.columns, arrays["item"],
                                  np.flatnonzero(keep), log=lambda *_: None)
    if fresh is not None:
      arrays["item_text"], arrays["item_text_mask"] = fresh
  return arrays, np.asarray(table.row_line)[keep]


@dataclasses.dataclass
class Explanation:
  """What `mscenario explain` computes for one run, in memory (the API's `Run.explain`):
  `summary` is explain.json's content; `attributions` [rows, features] are the per-row
  attributions of attributions.csv, with `lines`, `scenario`, `logit`, `baseline_logit`
  beside them; `table` [scenarios, features] is the mean |attribution| per scenario."""
  summary: dict
  features: list
  scenarios: list
  lines: np.ndarray           # [N] input line (split: prepared row index + 1)
  scenario: np.ndarray        # [N] scenario name of each row
  logit: np.ndarray           # [N]
  baseline_logit: np.ndarray  # [N]
  attributions: np.ndarray    # [N, F]
  out: str                    # where the files were written

  @property
  def residual(self) -> np.ndarray:
    """Completeness residual per row: sum of attributions - (logit - baseline logit)."""
    return self.attributions.sum(axis=1) - (self.logit - self.baseline_logit)

  @property
  def table(self) -> np.ndarray:
    """[S, F] mean |attribution| per scenario (rows `scenarios`, columns `features`; NaN
    for a scenario without explained rows)."""
    t = self.summary["mean_abs_attribution"]
    return np.asarray([[np.nan if t[s][f] is None else t[s][f] for f in self.features]
                       for s in self.scenarios], np.float64)

  def columns(self) -> dict:
    """attributions.csv's columns as a dict of arrays (`pandas.DataFrame(e.columns())`)."""
    return {"line": self.lines, "scenario": self.scenario, "logit": self.logit,
            "baseline_logit": self.baseline_logit, "residual": self.residual,
            **{f: self.attributions[:, i] for i, f in enumerate(self.features)}}


def explain(workdir: str, split: str = "test", rows: int = 2000,
            input_path: str | None = None, out: str | None = None,
            steps: int | None = None, batch_size: int = 256, overrides=(), config=None,
            log=print) -> Explanation:
  """Explain a work dir's best model (with its own config, or `config`); writes
  explain.json, attributions.csv and PNGs into `out` (default: the work dir)."""
  if steps is None:
    steps = integrated.DEFAULT_STEPS
  if steps < 1 or batch_size < 1:
    raise MscenarioError(f"--steps {steps} / batch size {batch_size}: need at least 1")
  run = load_run(workdir, overrides, log=log, config=config)
  data = run.data
  if input_path:
    arrays, lines = _input_rows(run, workdir, input_path)
    idx = _sample(np.arange(len(arrays["label"])), rows)
    lines = lines[idx]
    source = os.path.abspath(input_path)
  else:
    if split not in data.splits:
      raise MscenarioError(f"--split {split}: the data has splits {sorted(data.splits)}")
    if len(data.splits[split]) == 0:
      raise MscenarioError(f"--split {split} has no rows to explain")
    arrays = data.arrays
    idx = _sample(data.splits[split], rows)
    lines = idx + 1
    source = split
  if len(data.splits.get("train", ())) == 0:
    raise MscenarioError("the baseline is the training rows' mean embedding, and the data "
                         "has no training rows")
  explainer = Explainer(run.setup.model, run.setup.model.schema, run.state, data.arrays,
                        np.asarray(data.splits["train"]), steps)
  attributions = explainer.explain(arrays, idx, batch_size=min(batch_size, len(idx)))
  out = out or workdir
  os.makedirs(out, exist_ok=True)
  cold = []
  if run.text_tables and "items" in run.text_tables:
    cold = neighbours.cold_item_neighbours(
        arrays, idx, data.arrays, np.asarray(data.splits["train"]), run.text_tables["items"],
        data.transform.state["item_vocab"], run.setup.model.schema.scenario_names)
  result = report.write(out, run, explainer, attributions, arrays, lines, source,
                        batch_size=min(batch_size, len(idx)), cold_items=cold)
  log(report.summary_text(result, out))
  names = np.asarray(run.setup.model.schema.scenario_names)
  return Explanation(result, list(result["features"]), list(result["scenarios"]),
                     np.asarray(lines), names[attributions.scenario], attributions.logit,
                     attributions.base_logit, attributions.attr, out)


def explain_workdir(workdir: str, split: str = "test", rows: int = 2000,
                    input_path: str | None = None, out: str | None = None,
                    steps: int | None = None, batch_size: int = 256, overrides=(),
                    log=print) -> dict:
  """`explain` of a work dir with its own config; explain.json's content."""
  return explain(workdir, split, rows, input_path, out, steps, batch_size, overrides,
                 log=log).summary
