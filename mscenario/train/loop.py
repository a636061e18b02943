"""The training loop: data -> sharded state -> jitted steps -> metrics, checkpoints, report.

Everything that must be identical after a crash lives in the checkpoint (state, PRNG, loop
position, early-stopping record); everything else (timings, progress bars) is derived.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from tqdm import tqdm

from mscenario import config as config_lib
from mscenario.data import pipeline
from mscenario.data.prepare import PreparedData, prepare
from mscenario.errors import ConfigError, MscenarioError
from mscenario.flat import flatten
from mscenario.models.embedding import batch_ids
from mscenario.parallel import distributed
from mscenario.parallel import mesh as mesh_lib
from mscenario.train import checkpoint as ckpt_lib
from mscenario.train import fit as fit_lib
from mscenario.train import privacy as privacy_lib
from mscenario.train import workdir as workdir_lib
from mscenario.train.optim import make_optimizer
from mscenario.train.fit import TrainingDiverged  # noqa: F401  (part of this module's API)
from mscenario.train.steps import TrainState, make_eval_step, make_train_step

# Keys that may change between a run and its resumption (everything else must match).
RESUMABLE_CHANGES = ("train.epochs", "train.stop_after_steps", "train.patience",
                     "train.log_every_steps", "train.checkpoint_every_steps", "data.root",
                     "data.cache_dir", "mesh.data", "mesh.model", "distributed.coordinator",
                     "distributed.num_processes", "distributed.process_id", "train.prefetch",
                     "train.steps_per_call", "data.on_device", "data.device_budget_mb",
                     "data.allow_changed_data")


def versions() -> dict:
  import flax
  import orbax.checkpoint as ocp
  out = {"python": sys.version.split()[0], "platform": platform.platform(),
         "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax, "lib") else "",
         "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
         "orbax-checkpoint": getattr(ocp, "__version__", ""),
         "backend": jax.default_backend(), "devices": jax.device_count(),
         "processes": jax.process_count()}
  try:
    from importlib.metadata import version
    out["mscenario"] = version("mscenario")
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


# ---------------------------------------------------------------------------- setup
@dataclasses.dataclass
class Setup:
  config: object
  data: PreparedData
  mesh: object
  model: nn.Module
  tx: optax.GradientTransformation
  state_shardings: object
  batch_shardings: dict
  train_step: object
  eval_step: object
  abstract_state: object
  create_state: object
  step_fn: object = None    # the pure train step (train_step is its jit); fit.py scans it
  eval_fn: object = None    # the pure eval step (eval_step is its jit)
  cache: dict = dataclasses.field(default_factory=dict)  # device-resident columns (fit.py)
  privacy: object = None    # privacy.Plan when config.privacy.enabled


def example_batch(data: PreparedData, size: int) -> dict:
  idx = np.arange(min(size, len(data.arrays["label"])))
  batch = {k: np.asarray(v[idx]) for k, v in data.arrays.items() if k in pipeline.DEVICE_KEYS}
  batch["weight"] = np.ones(len(idx), np.float32)
  return batch


def _path_names(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def opt_state_shardings(opt_state, params, param_shardings, default):
  """Optimizer-state leaves that mirror a parameter (Adam moments, Adagrad accumulators) get
  that parameter's sharding; everything else (step counts) is replicated."""
  by_path = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(params),
                              jax.tree_util.tree_leaves(param_shardings)):
    by_path[_path_names(path)] = (leaf.shape, sh)

  def pick(path, leaf):
    names = _path_names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return default

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def build(config, data: PreparedData, mesh, text_tables: dict | None = None,
          schema=None) -> Setup:
  """`text_tables` ('items', 'scenarios' arrays): required when config.text.enabled; they
  become the frozen, row-sharded 'text' collection of the model's variables. `schema`:
  another layout of the data's features (a sweep's union of its replicas' vocabularies)."""
  from mscenario.models import fusion
  from mscenario.models.registry import build_model
  from mscenario.train import sparse
  schema = data.schema if schema is None else schema
  model_schema, text_values = schema, None
  if config.text.enabled:
    if text_tables is None:
      raise MscenarioError("config.text.enabled needs the text tables (loop.train encodes "
                           "them; or run `mscenario encode`)")
    model_schema = fusion.text_schema(config, data.schema, text_tables)
    text_values = fusion.table_values(model_schema.text, text_tables)
  seq = config.model.get("sequence", None)
  if seq is not None and seq.kind != "none":
    if not data.schema.history_length:
      raise ConfigError(f"model.sequence.kind={seq.kind!r} needs behaviour histories: set "
                        "--config.data.history.length=K (e.g. 20)")
    model_schema = dataclasses.replace(
        model_schema, sequence=(seq.kind, int(seq.layers), int(seq.heads), int(seq.width),
                                bool(seq.get("stats", True))))
  model = build_model(config.model, model_schema)
  embed_update = config.train.embed_update
  sparse_mode = embed_update != "dense"
  if sparse_mode:
    sparse.check_kind(embed_update)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
  batch = example_batch(data, 8)

  def init_variables():
    return model.init({"params": init_rng, "dropout": dropout_rng}, batch, train=False)

  def init_sparse_variables():
    """Sparse mode: init the model on given rows (no table param); the table is made by
    sparse.init_table, chunk by chunk."""
    ids = batch_ids(schema, batch)
    rows = jnp.zeros(ids.shape + (config.model.embed_dim,), jnp.float32)
    return model.init({"params": init_rng, "dropout": dropout_rng},
                      {**batch, "embedding_rows": rows}, train=False)

  abstract_vars = jax.eval_shape(init_variables)
  var_shardings = mesh_lib.logical_to_shardings(nn.get_partition_spec(abstract_vars), mesh)
  table_sharding = var_shardings["params"]["embedding"]["table"]

  def split_table(params):
    """Sparse mode: the table leaves the Flax params for state.embed."""
    params = dict(params)
    rest = {k: v for k, v in params["embedding"].items() if k != "table"}
    table = params["embedding"]["table"]
    if rest:
      params["embedding"] = rest
    else:
      del params["embedding"]
    return params, table

  abstract_params = nn.meta.unbox(abstract_vars)["params"]
  if sparse_mode:
    abstract_params, _ = split_table(abstract_params)
  tx = make_optimizer(config.train, abstract_params, clip=not sparse_mode)

  def create_state():
    embed = {}
    if sparse_mode:
      variables = nn.meta.unbox(init_sparse_variables())
      params = variables["params"]
      table = sparse.init_table(jax.random.fold_in(init_rng, 1), schema.table_rows,
                                config.model.embed_dim, config.model.embed_init_std)
      embed = {"table": table, "opt": sparse.init_opt_state(embed_update, table)}
    else:
      variables = nn.meta.unbox(init_variables())
      params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params), rng=state_rng, embed=embed)

  abstract_state = jax.eval_shape(create_state)
  rep = mesh_lib.replicated(mesh)
  param_shardings = var_shardings["params"]
  embed_shardings = {}
  if sparse_mode:
    param_shardings, _ = split_table(param_shardings)
    row_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        table_sharding.spec[0] if len(table_sharding.spec) else None))
    embed_shardings = {
        "table": table_sharding,
        "opt": {k: (row_sharding if v.ndim == 1 else table_sharding)
                for k, v in abstract_state.embed["opt"].items()}}
  opt_shardings = opt_state_shardings(abstract_state.opt_state, abstract_state.params,
                                      param_shardings, rep)
  state_shardings = TrainState(
      step=rep, params=param_shardings,
      model_state={k: (var_shardings[k] if k == fusion.TEXT_COLLECTION
                       else jax.tree_util.tree_map(lambda _: rep, v))
                   for k, v in abstract_state.model_state.items()},
      opt_state=opt_shardings, rng=rep, embed=embed_shardings)
  bs = mesh_lib.batch_sharding(mesh)
  batch_shardings = {k: bs for k in pipeline.DEVICE_KEYS if k in data.arrays or k == "weight"}
  id_dropout = float(config.train.get("item_id_dropout", 0.0))
  if not 0.0 <= id_dropout < 1.0:
    raise ConfigError(f"train.item_id_dropout={id_dropout}: expected a rate in [0, 1)")
  id_slot = fusion.item_feature_index(schema, config) if id_dropout > 0 else -1
  if id_dropout > 0 and id_slot < 0:
    raise ConfigError("train.item_id_dropout needs a sparse feature on the item field "
                      f"'{config.data.item_field}'")
  plan = (privacy_lib.make_plan(config, data, abstract_state.model_state)
          if config.privacy.enabled else None)
  step_fn = (privacy_lib.make_private_step(model, tx, schema, embed_update,
                                           config.train.embed_learning_rate, plan,
                                           (id_slot, id_dropout)) if plan else
             make_train_step(model, tx, schema, embed_update, config.train.embed_learning_rate,
                             config.train.grad_clip_norm, (id_slot, id_dropout)))
  train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                       out_shardings=(state_shardings, rep), donate_argnums=0)
  eval_fn = make_eval_step(model, schema)
  eval_step = jax.jit(eval_fn,
                      in_shardings=(state_shardings.params, state_shardings.model_state,
                                    state_shardings.embed, batch_shardings),
                      out_shardings=rep)
  abstract = ckpt_lib.abstract_like(abstract_state, state_shardings)
  create = jax.jit(create_state, out_shardings=state_shardings)
  if text_values is not None:
    create = _with_text_tables(create, text_values, state_shardings.model_state)
  return Setup(config, data, mesh, model, tx, state_shardings, batch_shardings, train_step,
               eval_step, abstract, create, step_fn, eval_fn, privacy=plan)


def _with_text_tables(create, values: dict, model_state_shardings):
  """Wraps create_state: the zero-initialised 'text' tables get their values, placed
  shard by shard (works across processes; no table baked into the jitted init)."""
  def fill(path, sharding):
    arr = values[_path_names(path)[-1]]
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])

  def create_with_text():
    from mscenario.models.fusion import TEXT_COLLECTION
    state = create()
    text = jax.tree_util.tree_map_with_path(fill, model_state_shardings[TEXT_COLLECTION])
    return state.replace(model_state={**state.model_state, TEXT_COLLECTION: text})
  return create_with_text


def embedding_table(state: TrainState) -> jax.Array:
  """The stacked embedding table, wherever the update mode keeps it."""
  if state.embed:
    return state.embed["table"]
  return state.params["embedding"]["table"]


def all_params(state: TrainState) -> dict:
  """Trainable parameters including the table (for comparisons and export)."""
  if not state.embed:
    return state.params
  params = dict(state.params)
  params["embedding"] = {**params.get("embedding", {}), "table": state.embed["table"]}
  return params


# ---------------------------------------------------------------------------- evaluation
def predict(setup: Setup, state: TrainState, split: str, *, desc: str = "") -> np.ndarray:
  """Probabilities for every row of `split`, in the split's row order."""
  cfg = setup.config
  size = _round_batch(cfg.train.eval_batch_size, setup.mesh)
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
  from mscenario.metrics import evaluate_by_scenario
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
  from mscenario.metrics import evaluate_by_scenario
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


def _round_batch(size: int, mesh) -> int:
  """Batch sizes must split evenly over the 'data' axis."""
  d = mesh.shape["data"]
  return max(d, (size // d) * d)


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
    from jax.experimental import multihost_utils
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
    check_resumable(wd.read_json(workdir_lib.CONFIG), config.to_dict())
  if jax.process_index() != 0:
    log = lambda *_: None  # noqa: E731
  data = load_data(config, log)
  text_tables = None
  if config.text.enabled:
    from mscenario.models.fusion import prepare_text_tables
    text_tables = prepare_text_tables(config, wd.path, data, log=log)
  if wd.exists(workdir_lib.DATA):
    check_same_data(wd.read_json(workdir_lib.DATA), data, config)
  setup = build(config, data, mesh, text_tables)
  write_run_info(config, wd, data)
  tc = config.train
  batch_size = _round_batch(tc.batch_size, mesh)
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


def final_report(setup, ckpts, workdir: str, log=print) -> dict:
  """Evaluate the best state on valid and test; write results.json, plots; print the table."""
  from mscenario.metrics import format_table
  from mscenario.metrics import classification as cls_metrics
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
    _plots(setup, probs, workdir, cls_metrics)
    log(f"\nTest results ({setup.config.model.name}, best epoch {results['best_epoch']}):")
    log(format_table(results))
    if skipped:
      log(f"skipped input rows: {skipped}")
    if "privacy" in results:
      log(privacy_lib.summary_line(results["privacy"]))
    log(f"results: {os.path.join(workdir, 'results.json')}")
  return results


def _plots(setup, probs, workdir, cls_metrics) -> None:
  from mscenario.metrics import plots
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
