"""Configs as code: `configs/*.py` define `get_config() -> ConfigDict`; the CLI applies
`--config.a.b=value` overrides on top, typed by the existing field.

`base_config()` lists every key the trainer reads, with defaults, so a config file only says
what differs and a typo in an override is an error instead of a silently ignored key.

Length: the schema is one list of every key with its default and a comment saying what it
does (most of the file); loading, overrides and the model-subtree checks read that list.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any, Sequence

import platformdirs
from ml_collections import ConfigDict

from mscenario.errors import ConfigError


# Each model's own hyperparameters (its module's fields, models/*.py) with the shipped sizes:
# the one source of the sizes every data set's config of a model trains with (build_model
# passes every key, so a module's own field defaults matter only to direct Python use). A
# module field not listed is one the model does not use (`hidden` of mmoe, ple, m2m, sarnet;
# tests/test_model_config.py checks both).
MODEL_DEFAULTS = {
    "seed": {"hidden": (256, 128),          # per-side encoder widths
             "tower_hidden": (64,),
             "user_features": (),           # user-side feature names; () = by name (user*, age …)
             "item_features": ()},          # item-side names; () = every feature not user-side
    "star": {"hidden": (256, 128),          # the star-topology FCN
             "aux_hidden": (64,),           # auxiliary network
             "scenario_matmul": "grouped"},  # grouped (rows packed per scenario) | dense (all S)
    "mmoe": {"num_experts": 4, "expert_hidden": (256,), "tower_hidden": (64,)},
    # Experts of 192 (2 shared + 1 per scenario), towers (32,): 0.8125 ± 0.0007 test AUC on
    # ML-1M against 0.8128 ± 0.0003 for experts of 256 / towers (64,), at 2.95 instead of
    # 4.54 GFLOP per 4096-batch and 1.41x the loop's examples/s (BENCHMARKS §15).
    "ple": {"ple_layers": 1, "shared_experts": 2, "specific_experts": 1,
            "expert_hidden": (192,), "tower_hidden": (32,)},
    # Bottom (256,), towers (32,) train 1.7x faster than (256, 128) / (64,) on ML-1M at
    # 0.8106 ± 0.0006 test AUC (vs 0.8101 ± 0.0008 for the larger sizes; BENCHMARKS §15).
    "sharedbottom": {"hidden": (256,), "tower_hidden": (32,)},
    "pepnet": {"hidden": (256, 128),
               "gate_gamma": 2.0,           # gate = gamma * sigmoid(.) (2 = neutral start at 1)
               "prior_features": ()},       # PPNet prior features; () = user_id, item_id
    "m2m": {"num_experts": 4, "expert_hidden": (256,), "tower_hidden": (64,),
            "meta_dim": 32,                 # expert output / meta-unit width
            "meta_tower_layers": 2,         # generated residual layers in the meta tower
            "transformer_layers": 1,        # encoder blocks over the feature tokens
            "transformer_heads": 2},
    # STAR layer hidden[0], then the LayerNorm MLP (the reference implementation's sizes).
    "m3oe": {"hidden": (128, 64), "num_experts": 4, "expert_hidden": (64, 32),
             "balance_init": 1.0},          # initial logit of the domain balance / weight
    "sarnet": {"shared_experts": 4, "specific_experts": 2, "expert_hidden": (64,),
               "tower_hidden": (32,),
               "debias_hidden": 16},        # width of the scenario debias network
    "adasparse": {"hidden": (256, 128),
                  "pruner_alpha": 1.0,      # pi = beta * sigmoid(alpha * v), cut below epsilon
                  "pruner_beta": 2.0, "pruner_epsilon": 1e-2},
}

# Keys on c.model itself, read by every model (or, `sequence`, by the trainer around it).
SHARED_MODEL_KEYS = ("name", "embed_dim", "dropout", "activation", "dtype", "batch_norm",
                     "embed_init_std", "interaction", "sequence")
# Shared keys a model does not read: a changed value would be ignored, so it is refused.
SHARED_KEYS_UNUSED = {
    "m3oe": ("activation", "batch_norm"),  # LayerNorm MLPs with ReLU
    # Their own embedding layout (not ScenarioModel.inputs), so no pairwise-dot input.
    "seed": ("interaction",), "pepnet": ("interaction",), "m2m": ("interaction",),
}


def _static(value: Any) -> Any:
  """Lists -> tuples (config.json stores tuples as lists: either spelling is one setting)."""
  if isinstance(value, (list, tuple)):
    return tuple(_static(v) for v in value)
  return value


def _flag(name: str, key: str) -> str:
  return f"--config.model.{name}.{key}" if name else f"--config.model.{key}"


def check_model(model: Any, own_keys: Sequence[str] | None = None,
                models: Sequence[str] | None = None) -> None:
  """Refuse every key of `c.model` that the selected model would ignore: an ignored setting
  is a wrong experiment that looks right. Checked: keys of the old flat layout, keys outside
  the model's subtree, a changed value in another model's subtree, a changed shared key the
  model does not read. `own_keys`: the subtree keys of a model not in MODEL_DEFAULTS (its
  module's fields; models/registry.py passes them); `models`: the registered names."""
  name = model.get("name", None)
  if not isinstance(name, str) or not name:
    raise ConfigError(f"model.name={name!r}: expected a model name "
                      f"(e.g. {', '.join(MODEL_DEFAULTS)})")
  # A model registered outside mscenario: its keys are known once the registry is loaded.
  known = name in MODEL_DEFAULTS or own_keys is not None
  own = tuple(MODEL_DEFAULTS[name]) if name in MODEL_DEFAULTS else tuple(own_keys or ())
  valid = (f"model {name!r} takes model.{name}.{{{', '.join(sorted(own))}}}; every model: "
           f"model.{{{', '.join(k for k in SHARED_MODEL_KEYS if k != 'name')}}}")
  defaults = base_config().model
  for key in model.keys():
    value = model[key]
    if key in SHARED_MODEL_KEYS:
      if key in SHARED_KEYS_UNUSED.get(name, ()) and _static(value) != defaults[key]:
        raise ConfigError(f"model.{key}={value!r} is set but model {name!r} does not use "
                          f"{key!r}: it would be ignored ({valid})")
      continue
    if not isinstance(value, (ConfigDict, dict)):  # the flat layout before model subtrees
      if key in own or (not known and any(key in keys for keys in MODEL_DEFAULTS.values())):
        raise ConfigError(
            f"model.{key}: each model's hyperparameters are in its own subtree: set "
            f"model.{name}.{key} ({_flag(name, key)}=...) instead of model.{key}")
      owners = [m for m, keys in MODEL_DEFAULTS.items() if key in keys]
      where = (f"; {key!r} belongs to " + ", ".join(f"model.{m}.{key}" for m in owners)
               if owners else "")
      raise ConfigError(f"model.{key}: not a setting of model {name!r} ({valid}){where}")
    if key == name:
      unknown = sorted(set(value.keys()) - set(own)) if known else []
      if unknown:
        raise ConfigError(f"model.{name}.{unknown[0]}: model {name!r} has no hyperparameter "
                          f"{unknown[0]!r} (its keys: {', '.join(sorted(own))})")
      continue
    if key not in MODEL_DEFAULTS:
      if models is not None and key not in models:
        raise ConfigError(f"model.{key}: no model is called {key!r} (models: "
                          f"{', '.join(sorted(models))})")
      continue  # another registered model's subtree: no shipped defaults to compare with
    for k in value.keys():
      if k not in MODEL_DEFAULTS[key] or _static(value[k]) != _static(MODEL_DEFAULTS[key][k]):
        raise ConfigError(
            f"model.{key}.{k}={value[k]!r} is set but model.name={name!r}: it would be "
            f"ignored (set --config.model.name={key} to train {key}; {valid})")


def upgrade(config: dict) -> dict:
  """A config dict written before each model had its own subtree (all keys flat on c.model)
  -> the current layout: the selected model's keys move into model.<name> (missing ones take
  the shipped default), the flat keys it ignored are dropped. Other dicts come back as given."""
  model = config.get("model") if isinstance(config, dict) else None
  if not isinstance(model, dict):
    return config
  flat = [k for k, v in model.items() if k not in SHARED_MODEL_KEYS and not isinstance(v, dict)]
  name = model.get("name")
  if not flat or name not in MODEL_DEFAULTS:
    return config
  new = {k: v for k, v in model.items() if k not in flat}
  own = json.loads(json.dumps(MODEL_DEFAULTS[name]))
  new[name] = {k: model.get(k, v) for k, v in own.items()}
  return {**config, "model": new}


def default_data_dir() -> str:
  """Where `mscenario data get` puts data sets (overridable with $MSCENARIO_DATA)."""
  if os.environ.get("MSCENARIO_DATA"):
    return os.environ["MSCENARIO_DATA"]
  return platformdirs.user_data_dir("mscenario")


def default_cache_dir() -> str:
  """Prepared-data cache (fingerprint keyed); overridable with $MSCENARIO_CACHE."""
  if os.environ.get("MSCENARIO_CACHE"):
    return os.environ["MSCENARIO_CACHE"]
  return platformdirs.user_cache_dir("mscenario")


def base_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 2022

  # ---- data ---------------------------------------------------------------------------
  c.data = ConfigDict()
  c.data.source = "movielens"      # movielens | recbole | table | tfds | synthetic
  c.data.name = "ml-1m"            # ml-1m | ml-100k for movielens; atomic file stem for recbole
  c.data.root = ""                 # dir holding the files; "" = <default_data_dir()>/<name>
  c.data.layout = "auto"           # movielens: auto | grouplens | recbole
  c.data.cache_dir = ""            # "" = default_cache_dir()
  c.data.on_error = "raise"        # raise | skip (skipped rows are counted and reported)
  # Table source (CSV/Parquet): file path(s) and a mapping canonical name -> column name.
  c.data.table = ConfigDict()
  c.data.table.train = ""          # path; or the single file to split
  c.data.table.valid = ""          # optional pre-split files
  c.data.table.test = ""
  c.data.table.columns = ConfigDict()  # e.g. {'user_id': 'uid', 'label': 'click'}
  c.data.table.delimiter = ","
  # TFDS source: a dataset prepared in array_record format, read with random access through
  # tfds (no TensorFlow needed at read time; nothing is downloaded or built).
  c.data.tfds = ConfigDict()
  c.data.tfds.name = ""            # 'my_dataset', 'my_dataset/config:1.0.0'; "" = data_dir is
                                   # the prepared version dir (the one with dataset_info.json)
  c.data.tfds.data_dir = ""        # where it was prepared; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.tfds.splits = ("train",)  # one split (divided by data.split) or three: train, valid,
                                   # test, e.g. ('train', 'validation', 'test'); slices work
  c.data.tfds.columns = ConfigDict()  # canonical name -> feature name, as data.table.columns
  # Features: name -> spec. kind in sparse | dense | multi | text.
  #   sparse: column, min_count (rarer values -> OOV), hash_buckets (0 = vocabulary)
  #   dense:  column, default (for missing), normalize (standard | minmax | none)
  #   multi:  column, min_count, max_len
  #   text:   column (kept raw for the language-model features)
  c.data.features = ConfigDict()
  c.data.scenario = ConfigDict()
  c.data.scenario.field = "age_bucket"
  c.data.scenario.groups = ConfigDict()   # scenario name -> list of raw values (as strings)
  c.data.scenario.order = ()       # scenario names in index order (default: sorted names)
  c.data.scenario.descriptions = ConfigDict()  # scenario name -> text (language-model features)
  c.data.label = ConfigDict()
  c.data.label.field = "rating"
  c.data.label.rule = "> 3"        # '> t', '>= t', '< t', '<= t', '== v', 'binary' (already 0/1)
  c.data.user_field = "user_id"    # groups for gAUC
  c.data.item_field = "item_id"
  c.data.time_field = "timestamp"
  c.data.split = ConfigDict()
  c.data.split.kind = "random"     # random | temporal | leave_last_out
  c.data.split.ratios = (0.8, 0.1, 0.1)
  c.data.split.seed = -1           # -1 = use c.seed
  c.data.history = ConfigDict()
  c.data.history.length = 0        # K previous events per row (data/history.py); 0 = none
  # Device-resident input (train/fit.py): upload the prepared columns to every device once and
  # gather batches there, `train.steps_per_call` steps per host call. auto = when the columns
  # fit `device_budget_mb` per device; always; never (host pipeline, prefetched).
  c.data.on_device = "auto"
  # Resuming a work dir whose prepared data has another fingerprint is refused unless true.
  c.data.allow_changed_data = False
  c.data.device_budget_mb = 1024
  c.data.fit_on = "train"          # train | all (the benchmark's behaviour, for parity)
  # Extra embedding rows per vocabulary feature, as a fraction of its fitted size, for values
  # first seen by `mscenario update` (0 = none: new values stay OOV; hashed features need none).
  c.data.reserve_fraction = 0.0
  # Cold-start / transfer protocols (applied after the split, seeded by the split seed):
  c.data.cold_items = 0.0          # fraction of items held out entirely: all their rows -> test
  c.data.holdout_scenario = ""     # scenario name whose rows all go to test (unseen scenario)
  # Collaborative-filtering features (data/collaborative.py): from the training split's
  # feedback (the raw label field, e.g. 1-5 stars, when numeric; else the 0/1 label) fit a
  # baseline mu + b_u + b_i, item- and user-KNN scores on its residuals, a residual SVD and
  # training counts, appended to every model's dense input as the cf_* columns. Training rows
  # get out-of-fold values (`folds` folds, so a row never sees its own feedback); validation /
  # test rows use all training rows. Off by default: prepared caches stay as they were.
  c.data.collaborative = ConfigDict()
  c.data.collaborative.enabled = False
  c.data.collaborative.folds = 5             # K of the out-of-fold computation (>= 2)
  c.data.collaborative.neighbors = 50        # top-K neighbours per item and per user
  c.data.collaborative.shrink_similarity = 100.0  # cosine x n_common / (n_common + this)
  c.data.collaborative.shrink_item_bias = 25.0    # b_i = sum(r - mu - b_u) / (this + n_i)
  c.data.collaborative.shrink_user_bias = 10.0    # b_u = sum(r - mu - b_i) / (this + n_u)
  c.data.collaborative.bias_passes = 3       # alternating b_i / b_u passes
  c.data.collaborative.svd_rank = 64         # rank of the truncated SVD of the residuals
  c.data.collaborative.chunk_rows = 1024     # rows per dense similarity block (fitting)
  # Synthetic generator (data.source='synthetic').
  c.data.synthetic = ConfigDict()
  c.data.synthetic.num_rows = 200_000
  c.data.synthetic.num_users = 5_000
  c.data.synthetic.num_items = 2_000
  c.data.synthetic.num_scenarios = 3
  c.data.synthetic.latent_dim = 8
  c.data.synthetic.num_topics = 12
  c.data.synthetic.seed = 0
  # Ground truth for explanations (mscenario/explain): () = the default world; else one row per
  # scenario of weights for (user_id, item_id, gender, age_bucket, region, category), and each
  # scenario's logit becomes base_s + sum_f w[s][f] * e_{s,f}(value), e standardised per feature
  # (e.g. ((1.5, 1, 0, 0, 0, .5), (0, 0, 1, 1.5, 0, .5), (0, 0, .5, 0, 1, 1.5))).
  c.data.synthetic.importance = ()

  # ---- model --------------------------------------------------------------------------
  # Keys every model reads (SHARED_KEYS_UNUSED: the exceptions); each model's own
  # hyperparameters are in its subtree
  # c.model.<name> (MODEL_DEFAULTS above), e.g. --config.model.mmoe.expert_hidden='(128,)'.
  # models/registry.py builds the selected one from its subtree and refuses any key it would
  # ignore (see check_model).
  c.model = ConfigDict()
  c.model.name = "star"
  c.model.embed_dim = 16
  c.model.dropout = 0.0
  c.model.activation = "relu"
  c.model.dtype = "float32"        # float32 | bfloat16 (compute dtype; params stay float32)
  c.model.batch_norm = True        # BatchNorm after each MLP Linear, as the benchmark's MLP does
  c.model.embed_init_std = 1e-4    # N(0, std) embedding init (the benchmark's default)
  c.model.interaction = "none"     # none | dot: pairwise embedding dot products join the input
  # Behaviour-sequence encoder over data.history (models/sequence.py): kind none |
  # transformer | lstm | mean | stats; its summary (plus, with stats=True, mean label / raw
  # feedback over the last 1/5/20/K events and log #earlier events) joins every model's
  # dense input.
  c.model.sequence = ConfigDict({"kind": "none", "layers": 1, "heads": 2, "width": 32,
                                 "stats": True})
  for name, keys in MODEL_DEFAULTS.items():
    c.model[name] = ConfigDict(keys)

  # ---- training -----------------------------------------------------------------------
  c.train = ConfigDict()
  c.train.epochs = 5
  c.train.batch_size = 4096
  c.train.eval_batch_size = 16384
  c.train.optimizer = "adamw"      # adamw | adam | sgd
  c.train.learning_rate = 1e-3
  c.train.weight_decay = 0.0
  c.train.embed_optimizer = "same"  # same | adagrad | adam | sgd
  c.train.embed_learning_rate = 1e-3
  c.train.embed_weight_decay = 0.0
  # How embedding rows are updated: 'dense' (the table is an ordinary param under
  # train.embed_optimizer) or sparse, touching only the batch's rows: 'rowwise_adagrad'
  # (one float of state per row) or 'lazy_adam'; both use train.embed_learning_rate.
  c.train.embed_update = "dense"
  c.train.grad_clip_norm = 0.0     # 0 = off
  # Item-id dropout (DropoutNet-style): each training row's item id is replaced by OOV with
  # this probability, so the OOV row learns "an unknown item" and a text-fused model learns
  # to lean on text when the id says nothing -- what brand-new items look like at test time.
  c.train.item_id_dropout = 0.0
  c.train.warmup_steps = 0
  # Learning-rate schedule after the warm-up: constant | cosine (from learning_rate down to
  # learning_rate * lr_end_fraction over lr_decay_steps; 0 = epochs x steps per epoch of the
  # configured run, so early stopping ends it part-way and a resume follows the same curve).
  c.train.lr_schedule = "constant"
  c.train.lr_decay_steps = 0
  c.train.lr_end_fraction = 0.0
  # Auxiliary objective on the raw feedback (train/aux.py): a small second head on the shared
  # input (embeddings + dense) predicts the label field's raw values (ML-1M: the 1-5 stars the
  # `rating > 3` label throws away); loss = BCE + weight * aux. Training only: predict, export
  # and serve score with the main head alone. 0 = off. The prepared data then keeps the raw
  # values (a `feedback` column; its own cache key).
  c.train.aux_rating = ConfigDict()
  c.train.aux_rating.weight = 0.0
  c.train.aux_rating.kind = "regression"  # regression (standardised values) | ordinal
  c.train.aux_rating.hidden = (64,)       # the head's hidden layers (ReLU)
  c.train.drop_last = True         # fixed-shape batches; see README for the last partial batch
  c.train.patience = 2             # early stopping on validation AUC (epochs); 0 = off
  c.train.eval_every_epochs = 1
  c.train.checkpoint_every_steps = 0  # 0 = end of each epoch only
  c.train.keep_checkpoints = 2
  c.train.log_every_steps = 50
  c.train.threshold = 0.5          # for accuracy / precision / recall / F1
  c.train.prefetch = 2
  # Steps per host call with device-resident data (a lax.scan over the steps): logging, NaN
  # checks and checkpoints happen at call boundaries; resume stays exact at any step.
  c.train.steps_per_call = 32
  c.train.stop_after_steps = -1    # testing hook: stop (as if killed) after this global step

  # ---- differential privacy (mscenario/train/privacy.py) ---------------------------------
  # DP-SGD: Poisson-sampled batches, per-unit clipping, Gaussian noise; embedding rows by
  # DP-AdaFEST row selection (noise only on selected rows); accounted with dp_accounting.
  c.privacy = ConfigDict()
  c.privacy.enabled = False
  c.privacy.epsilon = 0.0          # target epsilon: the noise is calibrated to it; or
  c.privacy.noise_multiplier = 0.0  # the gradient noise std / clip_norm (give one of the two)
  c.privacy.delta = 0.0            # 0 = 1/n (n = training rows, or users for unit='user')
  c.privacy.clip_norm = 1.0        # L2 bound of one unit's gradient (dense params + rows)
  c.privacy.unit = "example"       # example (one training row) | user (all of a user's rows)
  c.privacy.max_examples_per_user = 8  # unit='user': rows of a sampled user per step
  c.privacy.expected_batch_size = 0  # expected units per step (q*n); 0 = slots - 9 sqrt(slots)
  c.privacy.embed_noise = "sparse"  # sparse (DP-AdaFEST selection) | dense (noise on all rows)
  c.privacy.selection_noise_ratio = 3.0  # sigma_1 (row-count noise) = this x noise_multiplier
  c.privacy.selection_clip = 1.0   # L2 bound of one unit's row-count contribution
  c.privacy.selection_threshold = 0.0  # noisy-count threshold; 0 = ~10 untouched rows/step
  c.privacy.max_false_positives = 0  # cap on selected untouched rows per step; 0 = auto
  c.privacy.microbatch = 0         # units per vmap chunk of per-unit gradients; 0 = auto
  c.privacy.clipping = "ghost"     # ghost (norms, then weighted-loss gradient) | vmap

  # ---- vectorised sweeps (train/sweep.py) ---------------------------------------------------
  # `--config.sweep.seed=2022,2023,2024`: one replica per seed (its own split, init, batch
  # order, early stopping and work dir <workdir>/seed=<s>), all trained as one vmapped program.
  # Several keys: replica i takes the i-th value of each (equal lengths).
  c.sweep = ConfigDict()
  c.sweep.seed = ()
  c.sweep.learning_rate = ()       # train.learning_rate per replica
  c.sweep.embed_learning_rate = ()  # train.embed_learning_rate per replica
  c.sweep.weight_decay = ()        # train.weight_decay per replica (optimizer adamw)
  # auto | vmap | map: how the replica axis runs (auto: lax.map on CPU, vmap on accelerators).
  c.sweep.vectorize = "auto"

  # ---- parallelism ----------------------------------------------------------------------
  c.mesh = ConfigDict()
  c.mesh.data = -1                 # -1 = all devices not used by `model`
  c.mesh.model = 1
  c.distributed = ConfigDict()
  c.distributed.coordinator = ""   # host:port; "" = auto-detect (TPU VM / SLURM) or single process
  c.distributed.num_processes = 0
  c.distributed.process_id = -1

  # ---- language-model text features (see mscenario/text) --------------------------------
  c.text = ConfigDict()
  c.text.enabled = False
  c.text.model_path = ""           # local HF-format BERT-family dir; "" = packaged MiniLM
  c.text.item_template = ""        # "" = the source's default / the text features
  c.text.user_template = ""        # e.g. "{gender} user, age {age}"; "" = no user table
  c.text.batch_size = 64
  c.text.cache_dir = ""            # "" = <cache dir>/text
  # Fusion into the models (mscenario/models/fusion.py): concat | gate | text_only | none.
  c.text.fusion = "concat"
  c.text.proj_hidden = (128,)      # hidden widths of the item text projection; () = linear
  # A scenario with no training rows (new surface, holdout) is scored as the trained scenario
  # whose description is nearest: nearest | none (its own untrained parameters).
  c.text.unseen_scenario = "nearest"
  # With data.history: the candidate's text attends over the user's history items' texts ->
  # label / rating given to similar items (models/fusion.py history_affinity).
  c.text.history_affinity = True
  c.text.scenario_context = False  # scenario context from its description's embedding
  c.text.item_vectors = ""         # .npy [item_vocab_size, d] or Parquet keyed by item id
  return c


def load_config(path: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Load `configs/NAME.py` and apply `--config.a.b=value` (or `a.b=value`) overrides."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_mscenario_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a broken config file is the user's to fix: say where.
    raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config()")
  try:  # the user's code, like the module body above: its failure is theirs to fix
    config = module.get_config()
  except Exception as e:  # noqa: BLE001
    raise ConfigError(f"config file {path}: get_config() failed: {type(e).__name__}: "
                      f"{e}") from e
  if not isinstance(config, ConfigDict):
    raise ConfigError(f"config file {path}: get_config() returned "
                      f"{type(config).__name__}, expected an ml_collections ConfigDict")
  apply_overrides(config, overrides)
  if isinstance(config.get("model", None), ConfigDict):
    check_model(config.model)
  return config


def _literal(text: str, key: str):
  """`ast.literal_eval`, whose failures (SyntaxError, ValueError, TypeError for `{[]: 1}`,
  RecursionError / MemoryError for deep nesting) all mean: not a Python literal."""
  try:
    return ast.literal_eval(text)
  except Exception:  # noqa: BLE001
    raise ConfigError(f"--config.{key}={text}: not a Python literal") from None


def _same_kind(value, current, key: str, text: str):
  """`value` checked against (and, int -> float, coerced to) the type of `current`."""
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, (tuple, list)):
    if isinstance(value, (int, float, str)) and not isinstance(value, bool) and not (
        isinstance(value, str) and not all(isinstance(c, str) for c in current)):
      value = (value,)
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"--config.{key}={text}: expected a sequence like {tuple(current)!r}")
    kinds = {type(c) for c in current}
    if len(kinds) == 1 and next(iter(kinds)) in (bool, int, float):  # numbers stay numbers
      value = [_same_kind(v, current[0], key, text) for v in value]
    # config.json stores tuples as lists: either spelling is the same setting.
    return type(current)(value)
  if isinstance(current, bool) != isinstance(value, bool) or not isinstance(
      value, type(current)):
    raise ConfigError(
        f"--config.{key}={text}: expected {type(current).__name__} like {current!r}")
  return value


def _parse_value(text: str, current: Any, key: str) -> Any:
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"--config.{key}={text}: expected true or false")
  if isinstance(current, str):
    return text
  if current is None:
    try:
      return ast.literal_eval(text)
    except Exception:  # noqa: BLE001 -- not a literal: the text itself
      return text
  if isinstance(current, (ConfigDict, dict)):
    value = _literal(text, key)
    if not isinstance(value, dict):
      raise ConfigError(f"--config.{key}={text}: '{key}' is a section; expected a dict or "
                        f"an override of one of its keys ({sorted(current.keys())})")
    return value
  try:
    value = ast.literal_eval(text)
  except Exception:  # noqa: BLE001 -- see _literal
    raise ConfigError(f"--config.{key}={text}: expected a value like {current!r}") from None
  return _same_kind(value, current, key, text)


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
  """Apply `--config.a.b=value` overrides; any bad one is a ConfigError naming it."""
  for item in overrides:
    if not isinstance(item, str):
      raise ConfigError(f"override {item!r}: expected a string --config.key=value")
    text = item[len("--config."):] if item.startswith("--config.") else item
    if "=" not in text:
      raise ConfigError(f"override {item!r}: expected --config.key=value")
    key, raw = text.split("=", 1)
    parts = key.split(".")
    node = config
    for i, p in enumerate(parts[:-1]):
      if not isinstance(node, ConfigDict):
        raise ConfigError(f"--config.{key}: '{'.'.join(parts[:i])}' is a value, not a section")
      if p not in node:
        raise ConfigError(f"--config.{key}: unknown key '{p}'")
      node = node[p]
    if not isinstance(node, ConfigDict):
      raise ConfigError(f"--config.{key}: '{'.'.join(parts[:-1])}' is a value, not a section")
    leaf = parts[-1]
    if leaf not in node:
      # Mapping-like sections (feature specs, scenario groups, column maps) accept new keys.
      if parts[-2:-1] and parts[-2] in ("columns", "groups", "descriptions") and leaf:
        if not raw.strip():
          raise ConfigError(f"--config.{key}=: empty value (expected e.g. "
                            f"--config.{key}=column_name)")
        value = _literal(raw, key) if raw[:1] in ("[", "(") else raw
        with node.unlocked():
          node[leaf] = value
        continue
      owners = [m for m, keys in MODEL_DEFAULTS.items() if leaf in keys]
      if parts[:-1] == ["model"] and owners:  # the flat layout before model subtrees
        name = node.get("name", None)
        where = (f"--config.model.{name}.{leaf}" if name in owners else
                 f"--config.model.<name>.{leaf} (model.name is {name!r}, which has none)")
        raise ConfigError(f"--config.{key}: each model's hyperparameters are in its own "
                          f"subtree: use {where}; {leaf!r} is a key of {', '.join(owners)}")
      raise ConfigError(f"--config.{key}: unknown key '{leaf}' (known: {sorted(node.keys())})")
    value = _parse_value(raw, node[leaf], key)
    try:
      node[leaf] = value
    except (TypeError, ValueError, AttributeError, KeyError) as e:
      raise ConfigError(f"--config.{key}={raw}: {e}") from None
  return config


def to_json(config: ConfigDict) -> str:
  """The resolved config as a run records it (config.json). Of the model subtrees only the
  selected model's is written (check_model holds the others at their defaults): the file says
  what the run trained, and a later change to another model's shipped size is no change to
  this run (resuming compares the files)."""
  d = config.to_dict()
  model = d.get("model")
  if isinstance(model, dict):
    d["model"] = {k: v for k, v in model.items()
                  if k not in MODEL_DEFAULTS or k == model.get("name")}
  return json.dumps(d, indent=2, sort_keys=True, default=str)


def from_json(text: str) -> ConfigDict:
  """config.json -> ConfigDict: an old flat model section is upgraded, and the subtrees
  to_json left out come back at their defaults (so overrides and checks see one layout)."""
  config = ConfigDict(upgrade(json.loads(text)))
  if "model" in config and isinstance(config.model, ConfigDict):
    for name, keys in MODEL_DEFAULTS.items():
      if name not in config.model:
        config.model[name] = ConfigDict(keys)
  return config
