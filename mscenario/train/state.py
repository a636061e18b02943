"""The run's state and its program: the model from the config, the optimizer, the sharded
train state (abstract, for restoring onto any mesh), and the jitted train and eval steps.
Shared by train, update, eval, predict, export and sweeps."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from mscenario.data import pipeline
from mscenario.data.prepare import PreparedData
from mscenario.errors import ConfigError, MscenarioError
from mscenario.models import fusion
from mscenario.models.embedding import batch_ids
from mscenario.models.registry import build_model
from mscenario.parallel import mesh as mesh_lib
from mscenario.train import aux as aux_lib
from mscenario.train import checkpoint as ckpt_lib
from mscenario.train import privacy as privacy_lib
from mscenario.train import sparse
from mscenario.train.optim import make_optimizer, total_steps
from mscenario.train.steps import TrainState, make_eval_step, make_train_step

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
  step_for: object = None   # train config -> pure train step (sweeps: per-replica optimizer)
  aux: object = None        # train/aux.py AuxPlan when train.aux_rating.weight > 0


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


def lr_decay_steps(config, data: PreparedData) -> int:
  """The span of a decaying train.lr_schedule: epochs x this data's training batches per
  epoch (or train.lr_decay_steps); 0 for a constant rate."""
  tc = config.train
  if tc.get("lr_schedule", "constant") == "constant" or tc.get("lr_decay_steps", 0) > 0:
    return total_steps(tc, 0)
  if tc.embed_update != "dense":
    raise ConfigError(f"train.lr_schedule={tc.lr_schedule!r} decays the optax optimizers "
                      f"only; train.embed_update={tc.embed_update!r} updates the table at a "
                      "constant rate: use train.embed_update=dense")
  if config.privacy.enabled:
    raise ConfigError(f"train.lr_schedule={tc.lr_schedule!r} with privacy.enabled: Poisson "
                      "sampling sets the steps per epoch; set train.lr_decay_steps")
  n = len(data.splits["train"])
  per_epoch = n // tc.batch_size if tc.drop_last else -(-n // tc.batch_size)
  return total_steps(tc, max(per_epoch, 1))


def build(config, data: PreparedData, mesh, text_tables: dict | None = None,
          schema=None) -> Setup:
  """`text_tables` ('items', 'scenarios' arrays): required when config.text.enabled; they
  become the frozen, row-sharded 'text' collection of the model's variables. `schema`:
  another layout of the data's features (a sweep's union of its replicas' vocabularies)."""
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
  aux = aux_lib.make_plan(config, data, model)  # None unless train.aux_rating.weight > 0

  def init_variables():
    return aux_lib.with_head(
        aux, model.init({"params": init_rng, "dropout": dropout_rng}, batch, train=False),
        init_rng)

  def init_sparse_variables():
    """Sparse mode: init the model on given rows (no table param); the table is made by
    sparse.init_table, chunk by chunk."""
    ids = batch_ids(schema, batch)
    rows = jnp.zeros(ids.shape + (config.model.embed_dim,), jnp.float32)
    return aux_lib.with_head(aux, model.init({"params": init_rng, "dropout": dropout_rng},
                                             {**batch, "embedding_rows": rows}, train=False),
                             init_rng)

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
  decay_steps = lr_decay_steps(config, data)
  tx = make_optimizer(config.train, abstract_params, clip=not sparse_mode, steps=decay_steps)

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

  def step_for(train_cfg):
    """The train step under `train_cfg`'s optimizer settings (a sweep passes traced
    per-replica learning rates; the optimizer state's structure does not change)."""
    return make_train_step(model, make_optimizer(train_cfg, abstract_params,
                                                 clip=not sparse_mode, steps=decay_steps),
                           schema, embed_update, train_cfg.embed_learning_rate,
                           train_cfg.grad_clip_norm, (id_slot, id_dropout), aux)

  step_fn = (privacy_lib.make_private_step(model, tx, schema, embed_update,
                                           config.train.embed_learning_rate, plan,
                                           (id_slot, id_dropout)) if plan else
             make_train_step(model, tx, schema, embed_update, config.train.embed_learning_rate,
                             config.train.grad_clip_norm, (id_slot, id_dropout), aux))
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
               eval_step, abstract, create, step_fn, eval_fn, privacy=plan,
               step_for=step_for, aux=aux)


def _with_text_tables(create, values: dict, model_state_shardings):
  """Wraps create_state: the zero-initialised 'text' tables get their values, placed
  shard by shard (works across processes; no table baked into the jitted init)."""
  def fill(path, sharding):
    arr = values[_path_names(path)[-1]]
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])

  def create_with_text():
    state = create()
    text = jax.tree_util.tree_map_with_path(fill,
                                            model_state_shardings[fusion.TEXT_COLLECTION])
    return state.replace(model_state={**state.model_state, fusion.TEXT_COLLECTION: text})
  return create_with_text


def embedding_table(state: TrainState) -> jax.Array:
  """The stacked embedding table, wherever the update mode keeps it."""
  if state.embed:
    return state.embed["table"]
  return state.params["embedding"]["table"]


def all_params(state: TrainState) -> dict:
  """The model's trainable parameters including the table (for comparisons and export;
  without the training-only aux head of train.aux_rating)."""
  if not state.embed:
    return aux_lib.model_params(state.params)
  params = dict(aux_lib.model_params(state.params))
  params["embedding"] = {**params.get("embedding", {}), "table": state.embed["table"]}
  return params


def round_batch(size: int, mesh) -> int:
  """Batch sizes must split evenly over the 'data' axis."""
  d = mesh.shape["data"]
  return max(d, (size // d) * d)
