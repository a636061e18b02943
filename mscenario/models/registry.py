"""Model registry: config name -> Flax module class, and `build_model` from `c.model`."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn

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


def build_model(model_cfg: Mapping[str, Any], schema: FeatureSchema) -> nn.Module:
  """Instantiate `model_cfg['name']` with the config keys that model declares as fields.

  Keys a model does not use are ignored, so one `c.model` section serves every model.
  """
  name = model_cfg["name"]
  if name not in _MODELS:
    raise ConfigError(f"model.name={name!r}: unknown model (available: {', '.join(available_models())})")
  cls = _MODELS[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "schema"}
  kwargs = {k: _as_static(model_cfg[k]) for k in fields if k in model_cfg}
  model = cls(schema=schema, **kwargs)
  if hasattr(model, "validate"):
    model.validate()
  return model
