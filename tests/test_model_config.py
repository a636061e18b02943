"""Each model's hyperparameters in its own subtree c.model.<name>: the shipped configs build
the architectures they built before, a key the model would ignore is an error naming the valid
ones, and a flat config.json of an older run still opens."""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os

import jax
import pytest

import mscenario as ms
from mscenario import config as config_lib
from mscenario.errors import ConfigError
from mscenario.models import available_models, build_model
from mscenario.models import registry
from mscenario.models.registry import model_fields
from mscenario.train.loop import check_resumable
from mscenario.train.workdir import WorkDir
from tests.helpers import REPO
from tests.test_models import SCHEMA, make_batch, model_cfg

SHARED = {"embed_dim": 16, "dropout": 0.0, "activation": "relu", "dtype": "float32",
          "batch_norm": True, "embed_init_std": 1e-4, "interaction": "none"}
# The module fields every shipped config built before the subtrees (dumped from that code):
# the ML-1M protocol's architectures. `hidden` of mmoe / ple / m2m / sarnet is unused there.
BEFORE = {
    "adasparse": {"hidden": (256, 128), "pruner_alpha": 1.0, "pruner_beta": 2.0,
                  "pruner_epsilon": 0.01},
    "mmoe": {"hidden": (256, 128), "num_experts": 4, "expert_hidden": (256,),
             "tower_hidden": (64,)},
    "m2m": {"hidden": (256, 128), "num_experts": 4, "expert_hidden": (256,),
            "tower_hidden": (64,), "meta_dim": 32, "meta_tower_layers": 2,
            "transformer_layers": 1, "transformer_heads": 2},
    "m3oe": {"hidden": (128, 64), "num_experts": 4, "expert_hidden": (64, 32),
             "balance_init": 1.0},
    "pepnet": {"hidden": (256, 128), "gate_gamma": 2.0, "prior_features": ()},
    "ple": {"hidden": (256, 128), "ple_layers": 1, "shared_experts": 2, "specific_experts": 1,
            "expert_hidden": (192,), "tower_hidden": (32,)},
    "sarnet": {"hidden": (256, 128), "shared_experts": 4, "specific_experts": 2,
               "expert_hidden": (64,), "tower_hidden": (32,), "debias_hidden": 16},
    "seed": {"hidden": (256, 128), "tower_hidden": (64,), "user_features": (),
             "item_features": ()},
    "sharedbottom": {"hidden": (256,), "tower_hidden": (32,)},
    "star": {"hidden": (256, 128), "aux_hidden": (64,), "scenario_matmul": "grouped"},
}
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "ml1m_*.py"))
                 + glob.glob(os.path.join(REPO, "configs", "ml100k_*.py")))


def _fields(model) -> dict:
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.name not in ("parent", "name", "schema")}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_build_the_architecture_they_built_before(path):
  config = config_lib.load_config(path)
  stem = os.path.basename(path)[:-3].split("_", 1)[1]
  name = "mmoe" if stem in ("best", "cf") else stem
  assert config.model.name == name
  assert _fields(build_model(config.model, SCHEMA)) == {**SHARED, **BEFORE[name]}


def test_every_subtree_key_is_a_field_of_its_module():
  """MODEL_DEFAULTS and the modules agree; a field left out of a subtree is one the model
  does not read (next test)."""
  assert set(config_lib.MODEL_DEFAULTS) <= set(available_models())
  for name, keys in config_lib.MODEL_DEFAULTS.items():
    own = set(model_fields(name)) - set(config_lib.SHARED_MODEL_KEYS)
    assert set(keys) <= own, name
    assert own - set(keys) <= {"hidden"}, name
    # A model built in Python without a config gets the shipped sizes too.
    defaults = {f.name: f.default for f in dataclasses.fields(registry._MODELS[name])}
    for key, value in keys.items():
      assert defaults[key] == value or tuple(defaults[key]) == tuple(value), (name, key)


@pytest.mark.parametrize("name,field,value", [
    ("mmoe", "hidden", (7,)), ("ple", "hidden", (7,)), ("m2m", "hidden", (7,)),
    ("sarnet", "hidden", (7,)), ("m3oe", "activation", "tanh"),
    ("m3oe", "batch_norm", False), ("seed", "interaction", "dot"),
    ("pepnet", "interaction", "dot"), ("m2m", "interaction", "dot")])
def test_fields_left_out_of_a_subtree_are_unused(name, field, value):
  """What check_model refuses as 'ignored' really is: the same params and the same traced
  computation (jaxpr; traced, not run, so the check stays fast)."""
  assert field not in config_lib.MODEL_DEFAULTS[name]
  assert field in config_lib.SHARED_KEYS_UNUSED.get(name, ()) or field == "hidden"
  batch = make_batch()
  programs = []
  for model in (build_model(model_cfg(name), SCHEMA),
                build_model(model_cfg(name), SCHEMA).clone(**{field: value})):
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
    step = functools.partial(model.apply, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.PRNGKey(1)})
    programs.append(str(jax.make_jaxpr(step)(params, batch)))
  assert programs[0] == programs[1]


def test_subtree_override_reaches_the_module():
  config = ms.load_config(os.path.join(REPO, "configs", "ml1m_star.py"),
                          ["--config.model.name=mmoe", "--config.model.mmoe.expert_hidden=(128,)",
                           "--config.model.mmoe.num_experts=3"])
  model = build_model(config.model, SCHEMA)
  assert (type(model).__name__, model.expert_hidden, model.num_experts) == ("MMoE", (128,), 3)
  config = ms.load_config(os.path.join(REPO, "configs", "ml1m_ple.py"),
                          {"model.ple.tower_hidden": (16,)})
  assert build_model(config.model, SCHEMA).tower_hidden == (16,)


def test_keys_the_model_would_ignore_are_errors_naming_the_valid_ones(tmp_path):
  star = os.path.join(REPO, "configs", "ml1m_star.py")
  with pytest.raises(ConfigError, match=r"model\.ple\.expert_hidden=\(128,\) is set but "
                     r"model\.name='star': it would be ignored.*aux_hidden, hidden, "
                     r"scenario_matmul"):
    ms.load_config(star, ["--config.model.ple.expert_hidden=(128,)"])
  with pytest.raises(ConfigError, match=r"unknown key 'expert_size' \(known: \['expert_hidden', "
                     r"'num_experts', 'tower_hidden'\]\)"):
    ms.load_config(star, ["--config.model.mmoe.expert_size=3"])
  with pytest.raises(ConfigError, match=r"use --config\.model\.star\.aux_hidden"):
    ms.load_config(star, ["--config.model.aux_hidden=(8,)"])
  with pytest.raises(ConfigError, match=r"model\.batch_norm=False is set but model 'm3oe' "
                     r"does not use 'batch_norm'"):
    ms.load_config(star, ["--config.model.name=m3oe", "--config.model.batch_norm=false"])
  # Configs as code: a flat key or a key outside the subtree, set in the file.
  path = tmp_path / "flat.py"
  for line, match in [("c.model.expert_hidden = (64,)", r"set model\.mmoe\.expert_hidden"),
                      ("c.model.mmoe.hidden = (64,)",
                       r"model\.mmoe\.hidden: model 'mmoe' has no hyperparameter 'hidden' "
                       r"\(its keys: expert_hidden, num_experts, tower_hidden\)"),
                      ("c.model.mmoes = c.model.mmoe", r"model\.mmoes: no model is called")]:
    path.write_text("from mscenario.config import base_config\n\ndef get_config():\n"
                    f"  c = base_config()\n  c.model.name = 'mmoe'\n  {line}\n  return c\n")
    config = None
    with pytest.raises(ConfigError, match=match):
      config = config_lib.load_config(str(path))
      build_model(config.model, SCHEMA)  # a subtree of an unknown name: known at build


# A star run's config.json as written before the subtrees (the flat c.model of that code).
FLAT_MODEL = {
    "activation": "relu", "aux_hidden": [32], "balance_init": 1.0, "batch_norm": True,
    "debias_hidden": 16, "dropout": 0.0, "dtype": "float32", "embed_dim": 16,
    "embed_init_std": 0.0001, "expert_hidden": [256], "gate_gamma": 2.0, "hidden": [64, 32],
    "item_features": [], "meta_dim": 32, "meta_tower_layers": 2, "name": "star",
    "num_experts": 4, "ple_layers": 1, "prior_features": [], "pruner_alpha": 1.0,
    "pruner_beta": 2.0, "pruner_epsilon": 0.01, "scenario_matmul": "dense",
    "sequence": {"heads": 2, "kind": "none", "layers": 1, "stats": True, "width": 32},
    "shared_experts": 2, "specific_experts": 1, "tower_hidden": [64], "transformer_heads": 2,
    "transformer_layers": 1, "user_features": []}


def test_flat_config_json_of_an_older_run_is_upgraded(tmp_path):
  saved = json.loads(config_lib.to_json(config_lib.base_config()))
  saved["model"] = FLAT_MODEL
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = WorkDir(str(tmp_path)).read_config()
  assert dict(config.model.star) == {"hidden": [64, 32], "aux_hidden": [32],
                                     "scenario_matmul": "dense"}
  assert "expert_hidden" not in config.model and config.model.mmoe.expert_hidden == (256,)
  model = build_model(config.model, SCHEMA)
  assert (model.hidden, model.aux_hidden, model.scenario_matmul) == ((64, 32), (32,), "dense")
  # Resuming it with the same settings is no change; another size is.
  current = config_lib.base_config()
  current.model.star.hidden, current.model.star.aux_hidden = (64, 32), (32,)
  current.model.star.scenario_matmul = "dense"
  check_resumable(config_lib.upgrade(saved), current.to_dict())
  current.model.star.hidden = (64,)
  with pytest.raises(ConfigError, match=r"model\.star\.hidden"):
    check_resumable(config_lib.upgrade(saved), current.to_dict())


def test_config_json_holds_the_selected_subtree_and_reads_back_whole():
  config = config_lib.load_config(os.path.join(REPO, "configs", "ml1m_ple.py"),
                                  ["--config.model.ple.expert_hidden=(64,)"])
  written = json.loads(config_lib.to_json(config))["model"]
  assert written["ple"]["expert_hidden"] == [64]
  assert not set(written) & (set(config_lib.MODEL_DEFAULTS) - {"ple"})
  back = config_lib.from_json(config_lib.to_json(config))
  assert set(back.model) == set(config.model)
  config_lib.check_model(back.model)
  assert build_model(back.model, SCHEMA).expert_hidden == (64,)


def test_tensorboard_hparams_name_only_the_selected_model():
  from mscenario.train.fit import hparams_of
  config = config_lib.load_config(os.path.join(REPO, "configs", "ml1m_mmoe.py"))
  hp = hparams_of(config)
  assert hp["model.mmoe.expert_hidden"] == str(list(config.model.mmoe.expert_hidden))
  assert not [k for k in hp if k.startswith(("model.ple.", "model.star."))]
  assert hp["model.name"] == "mmoe" and "train.learning_rate" in hp and "seed" in hp
