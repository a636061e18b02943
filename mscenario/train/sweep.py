"""Vectorised sweeps: several runs of one config that differ in their seed and/or optimizer
settings (learning rates, weight decay), trained side
by side as one scanned program (`--config.sweep.seed=2022,2023,2024`).

Why: a multi-scenario model at batch 4096 leaves an accelerator mostly idle and its step is
dominated by per-call work (DESIGN.md §3); R replicas in one program share the calls, the
scan, the compilation and the process start-up, and (vmap) their matmuls batch. On CPU the
replica axis runs as `lax.map` by default (`sweep.vectorize`): XLA's CPU backend runs
batched matmuls slower than plain ones (BENCHMARKS §19).

Each replica is an ordinary run: its own split (the seed draws it), vocabularies, initial
state, PRNG, batch order, optimizer state, early stopping, checkpoints and work dir
(`<workdir>/seed=<s>`), readable by `eval`, `predict`, `export` and `ms.Run.open`.

Replicas whose seeds draw different splits have different vocabulary sizes. The program runs
on their union layout: every feature gets the largest replica's row count (a replica's own
rows sit at the start of its feature's block; the rest stay zero and are never read), and
each replica's alignment rows follow at the end. A replica's state is initialised exactly as
its separate run's (its own setup, its own shapes) and moved into the union layout; its
checkpoints are moved back. Zero rows get zero gradients, and Adam and weight decay leave
zero rows at zero, so the union layout changes no replica's arithmetic.

Length: the union table layout and the per-replica fan-out (checkpoints, logs, early
stopping) are one mechanism; neither is used without the other.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mscenario import config as config_lib
from mscenario.data.schema import TABLE_ROW_ALIGN, FeatureSchema
from mscenario.errors import ConfigError
from mscenario.parallel import distributed
from mscenario.parallel import mesh as mesh_lib
from mscenario.train import aux as aux_lib
from mscenario.train import fit as fit_lib
from mscenario.train import loop
from mscenario.train import report as report_lib
from mscenario.train import state as state_lib
from mscenario.train import workdir as workdir_lib

SWEEP_FILE = "sweep.json"
# Sweepable keys: config path of each `sweep.<name>`. Only values that leave the program's
# shapes and constants alone can differ between vmapped replicas.
SWEEPABLE = {"seed": "seed", "learning_rate": "train.learning_rate",
             "embed_learning_rate": "train.embed_learning_rate",
             "weight_decay": "train.weight_decay"}
# Swept optimizer settings enter the vmapped step as per-replica values (not constants); the
# optimizer's state has the same structure as a separate run's, so checkpoints are ordinary.
OPTIMIZER_KEYS = ("learning_rate", "embed_learning_rate", "weight_decay")


class _TrainOverlay:
  """config.train with some values replaced (by a replica's traced hyperparameters)."""

  def __init__(self, train_cfg, values: dict):
    self._cfg, self._values = train_cfg, values

  def __getattr__(self, name):
    if name in self._values:
      return self._values[name]
    return getattr(self._cfg, name)

  def get(self, name, default=None):
    return self._values[name] if name in self._values else self._cfg.get(name, default)


def vectorize_mode(config) -> str:
  """How the replica axis is computed: 'vmap' (one batched program: what fills an
  accelerator) or 'map' (lax.map: the replicas' steps one after another inside the same
  program). 'auto' = map on CPU, where XLA's batched matmuls ran 0.36-0.64x the examples/s
  of plain ones while lax.map ran 0.79-0.98x (BENCHMARKS §19); vmap elsewhere."""
  mode = config.sweep.get("vectorize", "auto")
  if mode not in ("auto", "vmap", "map"):
    raise ConfigError(f"sweep.vectorize={mode!r}: expected auto, vmap or map")
  if mode == "auto":
    return "map" if jax.default_backend() == "cpu" else "vmap"
  return mode


def sweep_values(config) -> dict[str, tuple]:
  """{name: values} of the non-empty `config.sweep` entries (checked)."""
  sweep = config.get("sweep", None)
  if sweep is None:
    return {}
  out = {}
  for name, values in sweep.items():
    if name == "vectorize":
      continue
    if name not in SWEEPABLE:
      raise ConfigError(f"sweep.{name}: not sweepable (sweepable: {sorted(SWEEPABLE)})")
    values = tuple(values)
    if values:
      out[name] = values
  out = {k: out[k] for k in SWEEPABLE if k in out}  # names list the seed first
  if len(out) > 1 and len({len(v) for v in out.values()}) > 1:
    raise ConfigError(f"sweep: every swept key needs the same number of values (replica i "
                      f"takes the i-th of each), got { {k: len(v) for k, v in out.items()} }")
  if out and len(set(zip(*out.values()))) != len(next(iter(out.values()))):
    raise ConfigError(f"sweep: two replicas would be the same run ({out})")
  return out


def replica_configs(config) -> list[tuple[str, object]]:
  """(work-dir name, the replica's own config without a sweep) per replica."""
  values = sweep_values(config)
  count = len(next(iter(values.values())))
  out = []
  for r in range(count):
    c = config_lib.from_json(config_lib.to_json(config))
    name = ",".join(f"{k}={v[r]}" for k, v in values.items())
    with c.unlocked():
      for k, v in values.items():
        node, *path = SWEEPABLE[k].split(".")[::-1]
        parent = c
        for p in reversed(path):
          parent = parent[p]
        parent[node] = type(parent[node])(v[r])
      for k in SWEEPABLE:
        if k in c.sweep:
          c.sweep[k] = ()
    out.append((name, c))
  return out


# ---------------------------------------------------------------------------- union layout
@dataclasses.dataclass(frozen=True)
class UnionSchema(FeatureSchema):
  """The replicas' features, each with the largest replica's vocabulary, and a table of
  `rows` rows (the union blocks plus room for every replica's alignment rows)."""
  rows: int = 0

  @property
  def table_rows(self) -> int:
    return self.rows


def union_schema(schemas: list[FeatureSchema]) -> UnionSchema:
  first = schemas[0]
  for s in schemas[1:]:
    same = ([f.name for f in s.sparse] == [f.name for f in first.sparse]
            and [(f.name, f.max_len) for f in s.multi] == [(f.name, f.max_len)
                                                          for f in first.multi]
            and s.dense == first.dense and s.scenario_names == first.scenario_names
            and s.history_length == first.history_length)
    if not same:
      raise ConfigError("sweep: the replicas' prepared data have different features or "
                        "scenarios; only the seed may differ between replicas")
  sparse = tuple(dataclasses.replace(f, vocab_size=max(s.sparse[i].vocab_size for s in schemas))
                 for i, f in enumerate(first.sparse))
  multi = tuple(dataclasses.replace(f, vocab_size=max(s.multi[i].vocab_size for s in schemas))
                for i, f in enumerate(first.multi))
  used = sum(f.vocab_size for f in (*sparse, *multi))
  tail = max(s.table_rows - s.total_embedding_rows for s in schemas)
  rows = -(-max(used + tail, 1) // TABLE_ROW_ALIGN) * TABLE_ROW_ALIGN
  return UnionSchema(sparse=sparse, multi=multi, dense=first.dense,
                     scenario_names=first.scenario_names,
                     user_vocab_size=max(s.user_vocab_size for s in schemas),
                     item_vocab_size=max(s.item_vocab_size for s in schemas),
                     history_length=first.history_length,
                     history_item_index=first.history_item_index, rows=rows)


def row_map(schema: FeatureSchema, union: UnionSchema) -> np.ndarray:
  """Union-table row of each of `schema`'s table rows (features, then alignment rows)."""
  parts = [np.arange(f.vocab_size) + o for f, o in
           zip((*schema.sparse, *schema.multi), union.embedding_offsets)]
  used = sum(f.vocab_size for f in (*union.sparse, *union.multi))
  parts.append(used + np.arange(schema.table_rows - schema.total_embedding_rows))
  return np.concatenate(parts).astype(np.int32)


def _is_table(path) -> bool:
  """Leaves laid out like the embedding table: the table and its optimizer moments."""
  names = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
  return names[-2:] == ("embedding", "table")


def to_union(state, rows: np.ndarray, union_state):
  """A replica's state (its own table shape) in the union layout."""
  def move(path, leaf, target):
    if not _is_table(path):
      return leaf
    return jnp.zeros(target.shape, leaf.dtype).at[rows].set(leaf)
  return jax.tree_util.tree_map_with_path(move, state, union_state)


def from_union(state, rows: np.ndarray):
  """The inverse of to_union: a replica's rows back in its own layout."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf[rows] if _is_table(path) else leaf, state)


# ---------------------------------------------------------------------------- the program
def stacked_shardings(shardings):
  """Each leaf's sharding with a leading (replica) axis that is not split."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), shardings)


class SweepBatches(fit_lib.DeviceBatches):
  """DeviceBatches for R replicas: columns [R, N, ...] and row orders [R, batches, batch]
  on the devices; one call runs n steps of every replica (advance and end_epoch are
  DeviceBatches': the program below takes the stacked arrays)."""

  def __init__(self, union_setup, runs: list, steps_per_call: int):
    if steps_per_call < 1:
      raise ConfigError(f"train.steps_per_call={steps_per_call}: expected at least 1")
    self.its = [r.train_it for r in runs]
    counts = {it.num_batches for it in self.its}
    if len(counts) > 1:
      raise ConfigError(f"sweep: the replicas' training splits give different numbers of "
                        f"batches per epoch ({sorted(counts)}); vectorised replicas step "
                        "together. Run them as separate runs.")
    self.num_batches = counts.pop()
    self.global_batch_size = self.its[0].global_batch_size
    self.max_steps_per_call = steps_per_call
    mesh = union_setup.mesh
    keys = fit_lib.column_keys(union_setup)
    rep = mesh_lib.replicated(mesh)
    self.columns = {}
    for k in keys:
      cols = [np.asarray(r.setup.data.arrays[k]) for r in runs]
      if len({c.shape for c in cols}) > 1:
        raise ConfigError(f"sweep: column '{k}' has different shapes across replicas "
                          f"({[c.shape for c in cols]})")
      self.columns[k] = fit_lib.upload_replicated(np.stack(cols), rep)
    self.index_sharding = NamedSharding(mesh, P(None, None, "data"))
    self._multi = _vmapped_steps(union_setup, {k: rep for k in keys}, self.index_sharding,
                                 [r.config for r in runs])
    self._rows = self._weight = None
    self._pos = 0

  def start_epoch(self, epoch: int, start: int) -> None:
    pairs = [it.epoch_rows(epoch) for it in self.its]
    self._rows = jax.make_array_from_process_local_data(
        self.index_sharding, np.stack([r for r, _ in pairs]))
    self._weight = jax.make_array_from_process_local_data(
        self.index_sharding, np.stack([w for _, w in pairs]))
    self._pos = start


def _vmapped_steps(setup, column_shardings: dict, index_sharding, configs: list):
  """jit of (states, columns, rows, weight, start, n) -> n steps of every replica: a scan
  whose body is the one-run gather-then-step, vmapped over the replica axis. Optimizer
  settings that differ between the replicas' configs are vmapped arguments of the step."""
  swept = {k: np.asarray([c.train[k] for c in configs], np.float32) for k in OPTIMIZER_KEYS
           if len({c.train[k] for c in configs}) > 1}
  if swept and setup.config.train.optimizer != "adamw" and "weight_decay" in swept:
    raise ConfigError("sweep.weight_decay needs train.optimizer=adamw (the other optimizers "
                      "add weight decay as a separate stage only when it is non-zero)")
  train_cfg = setup.config.train
  vectorize = vectorize_mode(setup.config)

  def one(state, batch, hyper):
    step_fn = (setup.step_for(_TrainOverlay(train_cfg, hyper)) if hyper else setup.step_fn)
    return step_fn(state, batch)

  def gather(columns, rows, weight):
    return {**{k: jnp.take(c, rows, axis=0) for k, c in columns.items()}, "weight": weight}

  def multi(states, columns, rows, weight, start, n):
    rows = jax.lax.dynamic_slice_in_dim(rows, start, n, axis=1)
    weight = jax.lax.dynamic_slice_in_dim(weight, start, n, axis=1)
    hyper = {k: jnp.asarray(v) for k, v in swept.items()}

    def body(states, xs):
      # Every replica's batch first (a gather from its own columns), then the steps: mapping
      # over the columns themselves would slice whole [N, ...] columns in every step.
      batches = jax.vmap(gather)(columns, *xs)
      if vectorize == "map":
        return jax.lax.map(lambda a: one(*a), (states, batches, hyper))
      return jax.vmap(one)(states, batches, hyper)

    return jax.lax.scan(body, states, (jnp.swapaxes(rows, 0, 1), jnp.swapaxes(weight, 0, 1)))

  state_shardings = stacked_shardings(setup.state_shardings)
  stacked_columns = stacked_shardings(column_shardings)
  rep = mesh_lib.replicated(setup.mesh)
  return jax.jit(multi, in_shardings=(state_shardings, stacked_columns, index_sharding,
                                      index_sharding, rep),
                 out_shardings=(state_shardings, rep), static_argnums=5, donate_argnums=0)


# ---------------------------------------------------------------------------- fan-out
class _Replicas:
  """Checkpoints and logger of the sweep: each call goes to every replica still training,
  with that replica's slice of the stacked state in its own layout."""

  def __init__(self, runs: list, maps: list[np.ndarray], names: list[str], log=print):
    self.runs, self.maps, self.names, self.log = runs, maps, names, log
    self.done = [bool(run.progress.get("stopped")) for run in runs]

  def state(self, states, r: int):
    """Replica r's state in its own layout, placed as its own run places it."""
    own = from_union(jax.tree_util.tree_map(lambda x: x[r], states), self.maps[r])
    return jax.device_put(own, self.runs[r].setup.state_shardings)

  def meta(self, p: dict) -> dict:
    return p

  def _meta_of(self, p: dict, r: int) -> dict:
    return self.runs[r].meta({"epoch": p["epoch"], "batch": p["batch"], **p["replicas"][r]})

  def save_latest(self, step: int, states, p: dict) -> None:
    for r, run in enumerate(self.runs):
      if not self.done[r]:
        run.ckpts.save_latest(step, self.state(states, r), self._meta_of(p, r))

  def latest_step(self):
    steps = [run.ckpts.latest_step() for run in self.runs]
    return None if None in steps else min(steps)

  def wait(self) -> None:
    for run in self.runs:
      run.ckpts.wait()

  def write(self, record: dict) -> None:
    """One metrics record per replica (values that are lists hold one entry per replica)."""
    for r, run in enumerate(self.runs):
      if self.done[r]:
        continue
      run.logger.write({k: (v[r] if isinstance(v, list) else v) for k, v in record.items()})

  def end_of_epoch(self, states, p: dict, step: int, epoch_loss) -> None:
    shown = []
    for r, run in enumerate(self.runs):
      if self.done[r]:
        continue
      rp = p["replicas"][r]
      own = {"epoch": p["epoch"], "batch": p["batch"], **rp}
      run.end_of_epoch(self.state(states, r), own, step, None)
      rp.update({k: v for k, v in own.items() if k not in ("epoch", "batch")})
      # Its separate run would end here: nothing more is logged or saved for it.
      self.done[r] = bool(own.get("stopped"))
      auc = own["history"][-1]["valid_auc"]
      shown.append(f"{self.names[r]} {auc:.4f}" + (" (early stop)" if self.done[r] else ""))
    self.log(f"epoch {p['epoch']}: valid AUC {', '.join(shown)}")
    p["stopped"] = all(self.done)

  def close(self) -> None:
    for run in self.runs:
      run.logger.close()


# ---------------------------------------------------------------------------- train
def train(config, workdir: str, *, log=print) -> list[dict]:
  """Train every replica of `config.sweep` in `workdir/<name>`; returns their results."""
  with fit_lib.Preemption() as preemption:
    return _train(config, workdir, preemption, log=log)


@dataclasses.dataclass
class SweepParts:
  """A sweep between start-up and the loop: the replicas' runs, the union program and its
  batch source, the stacked state and the shared loop position."""
  names: list
  runs: list
  setup: object             # the union layout's program (state_lib.Setup)
  fan: "_Replicas"
  source: SweepBatches
  stacked: object
  progress: dict


def open_sweep(config, workdir: str, *, log=print) -> SweepParts:
  """Check the config, open (or resume) every replica's run and stack their states."""
  replicas = replica_configs(config)
  if config.text.enabled:
    raise ConfigError("sweep: text features are not supported in vectorised sweeps yet; "
                      "run the seeds as separate runs")
  if config.privacy.enabled:
    raise ConfigError("sweep: differentially private training samples its own batches "
                      "(Poisson); run the seeds as separate runs")
  if config.train.embed_update != "dense":
    raise ConfigError(f"sweep: train.embed_update={config.train.embed_update!r}: vectorised "
                      "sweeps support the dense embedding update only")
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(config.mesh)
  quiet = lambda *_: None  # noqa: E731
  runs = [loop.open_run(c, os.path.join(workdir, name), mesh, log=quiet)
          for name, c in replicas]
  for run in runs:
    if not fit_lib.use_device(run.setup):
      raise ConfigError("sweep: the replicas' columns must fit on the devices "
                        "(data.on_device / data.device_budget_mb)")
  plans = {aux_lib.plan_key(run.setup) for run in runs}
  if len(plans) > 1:
    raise ConfigError(f"sweep: train.aux_rating differs between the replicas' data "
                      f"({sorted(plans, key=str)}: levels of the raw feedback); run them as "
                      "separate runs")
  union = union_schema([run.setup.data.schema for run in runs])
  union_setup = state_lib.build(replicas[0][1], runs[0].setup.data, mesh, schema=union)
  maps = [row_map(run.setup.data.schema, union) for run in runs]
  names = [name for name, _ in replicas]
  fan = _Replicas(runs, maps, names, log)
  positions = {(run.progress["epoch"], run.progress["batch"]) for run in runs
               if not run.progress.get("stopped")}
  if len(positions) > 1:
    raise ConfigError(f"sweep: the replicas' latest checkpoints are at different positions "
                      f"{sorted(positions)}; resume them as separate runs")
  epoch, batch = positions.pop() if positions else (config.train.epochs, 0)
  abstract = jax.eval_shape(union_setup.create_state)
  states = [to_union(run.state, m, abstract) for run, m in zip(runs, maps)]
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)
  stacked = jax.device_put(stacked, stacked_shardings(union_setup.state_shardings))
  progress = {"epoch": epoch, "batch": batch,
              "replicas": [{k: v for k, v in run.progress.items()
                            if k not in ("epoch", "batch", "config")} for run in runs]}
  progress["stopped"] = all(fan.done)
  source = SweepBatches(union_setup, runs, int(config.train.get("steps_per_call", 32)))
  log(f"sweep: {len(runs)} replicas of {config.model.name} ({', '.join(names)}) as one "
      f"program ({vectorize_mode(config)} over replicas), {source.num_batches} steps/epoch, "
      f"mesh {dict(mesh.shape)}; work dirs under {workdir}")
  return SweepParts(names, runs, union_setup, fan, source, stacked, progress)


def _train(config, workdir: str, preemption, *, log=print) -> list[dict]:
  distributed.maybe_initialize(config.distributed)
  if jax.process_index() != 0:
    log = lambda *_: None  # noqa: E731
  parts = open_sweep(config, workdir, log=log)
  names, runs, fan, source = parts.names, parts.runs, parts.fan, parts.source
  stacked, progress = parts.stacked, parts.progress
  tc = config.train
  t0 = time.perf_counter()
  try:
    stacked, progress = fit_lib.fit(
        parts.setup, stacked, progress, source, epochs=tc.epochs, ckpts=fan, logger=fan,
        meta=fan.meta, end_of_epoch=fan.end_of_epoch, stop_after_steps=tc.stop_after_steps,
        checkpoint_every=tc.checkpoint_every_steps, log_every=tc.log_every_steps,
        preemption=preemption, desc="sweep epoch")
  finally:
    fan.wait()
    fan.close()
  train_seconds = time.perf_counter() - t0
  if tc.stop_after_steps >= 0 and not progress.get("finished"):
    for run in runs:
      run.ckpts.close()
    return []
  if preemption.flag:
    for run in runs:
      run.ckpts.close()
    raise fit_lib.Preempted("preempted (SIGTERM) after the last training step (checkpoints "
                            "saved); run the same command to write the final reports")
  members = ensemble_probs(runs)  # before finish() closes the checkpoints
  results = [run.finish() for run in runs]
  summary = summarize(names, results)
  if members is not None:
    summary["ensemble"] = ensemble_report(runs[0].setup, members)
  summary["train_seconds"] = train_seconds
  if jax.process_index() == 0:
    workdir_lib.write_json(os.path.join(workdir, SWEEP_FILE),
                           {"replicas": names, "config": config.to_dict(), **summary},
                           indent=2, sort_keys=True)
    auc = summary["test_auc"]
    log(f"\nsweep: test AUC {auc['mean']:.4f} ± {auc['std']:.4f} over {len(runs)} replicas "
        f"({', '.join(f'{n}: {a:.4f}' for n, a in zip(names, auc['values']))}); "
        f"{os.path.join(workdir, SWEEP_FILE)}")
    if "ensemble" in summary:
      log(f"sweep: the {len(runs)} replicas share one split; their ensemble (mean "
          f"probability) has test AUC {summary['ensemble']['overall']['auc']:.4f}")
  return results


def ensemble_probs(runs: list) -> list[np.ndarray] | None:
  """Each replica's best-checkpoint test probabilities when every replica has the same
  prepared data (one split: e.g. `data.split.seed` held while `sweep.seed` varies the init);
  None otherwise (an ensemble over different test sets means nothing)."""
  if len(runs) < 2 or len({run.setup.data.fingerprint for run in runs}) > 1:
    return None
  out = []
  for run in runs:
    restored = (run.ckpts.restore_best(run.setup.abstract_state)
                or run.ckpts.restore_latest(run.setup.abstract_state))
    out.append(report_lib.predict(run.setup, restored[0], "test"))
  return out


def ensemble_report(setup, members: list[np.ndarray]) -> dict:
  """Test metrics of the replicas' ensemble: the mean of their predicted probabilities."""
  result = report_lib.evaluate_split(setup, None, "test", np.mean(members, axis=0))
  return {"members": len(members), "overall": result["overall"],
          "scenarios": result["scenarios"]}


def summarize(names: list[str], results: list[dict]) -> dict:
  """Mean ± sample std of the replicas' overall test metrics (what papers report)."""
  out = {}
  for metric in ("auc", "logloss", "gauc"):
    values = [r["overall"].get(metric) for r in results]
    if all(isinstance(v, float) for v in values):
      out[f"test_{metric}"] = {
          "mean": statistics.fmean(values),
          "std": statistics.stdev(values) if len(values) > 1 else 0.0,
          "values": values}
  return out
