"""Model registry: config name -> Flax module class, and `build_model` from `c.model`: the
shared keys plus the model's own subtree `c.model.<name>`, checked against the module's fields
(mscenario/config.py check_model: a key the model would ignore is an error)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn

from mscenario.config import MODEL_DEFAULTS, SHARED_MODEL_KEYS, check_model
from mscenario.data.schema import FeatureSchema
from mscenario.errors import ConfigError

_MODELS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
  """Class decorator: make a model buildable as `c.model.name = name`."""
  def wrap(cls: type[nn.Module]) -> type[nn.Module]:
    if name in _MODELS and _MODELS[name] is not cls:
      raise ValueError(f"model name {name!r} registered twice")
    _MODELS[name] = cls
    return cls
  return wrap


def available_models() -> tuple[str, ...]:
  """Every registered name. The built-in models are always among them: importing this module
  runs mscenario/models/__init__.py first, which imports (and so registers) each of them."""
  return tuple(sorted(_MODELS))


def _as_static(value: Any) -> Any:
  """Config values -> hashable module fields (lists -> tuples), so modules stay hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(_as_static(v) for v in value)
  return value


def model_fields(name: str) -> tuple[str, ...]:
  """The config-settable fields of model `name`'s module (not the schema, not Flax's own)."""
  return tuple(f.name for f in dataclasses.fields(_MODELS[name])
               if f.name not in ("parent", "name", "schema"))


def build_model(model_cfg: Mapping[str, Any], schema: FeatureSchema) -> nn.Module:
  """Instantiate model `model_cfg['name']` from the shared keys and its subtree
  `model_cfg[name]` (missing keys: config.MODEL_DEFAULTS, else the module's default).

  Any key the model would ignore is a ConfigError naming the valid ones (check_model).
  """
  name = model_cfg.get("name", None)
  if name not in _MODELS:
    raise ConfigError(f"model.name={name!r}: unknown model "
                      f"(available: {', '.join(available_models())})")
  fields = model_fields(name)
  own = [f for f in fields if f not in SHARED_MODEL_KEYS]
  check_model(model_cfg, own_keys=own, models=available_models())
  subtree = model_cfg.get(name, None) or {}
  values = {**MODEL_DEFAULTS.get(name, {}), **{k: subtree[k] for k in subtree.keys()}}
  not_fields = sorted(set(values) - set(own))
  if not_fields:  # MODEL_DEFAULTS out of step with the module: mscenario's bug, said plainly
    raise ConfigError(f"model.{name}.{not_fields[0]}: not a field of {_MODELS[name].__name__} "
                      f"(its fields: {', '.join(own)})")
  kwargs = {k: _as_static(model_cfg[k]) for k in fields
            if k in SHARED_MODEL_KEYS and k in model_cfg}
  kwargs.update({k: _as_static(v) for k, v in values.items()})
  model = _MODELS[name](schema=schema, **kwargs)
  if hasattr(model, "validate"):
    model.validate()
  return model
