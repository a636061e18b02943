"""The device mesh and the one table of logical-axis rules.

Modules name their parameter axes logically ('vocab', 'embed', 'mlp'); this file alone decides
which mesh axis each name maps to. Embedding tables are row-sharded over 'model' (their rows
are the memory), batches split over 'data', dense layers replicated.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mscenario.errors import ConfigError

MESH_AXES = ("data", "model")
LOGICAL_AXIS_RULES = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", None),
)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Mesh ('data', 'model') from `config.mesh`; data=-1 takes every device not on `model`.

  Auto axis types keep plain `jnp.take` gathers on a row-sharded table valid (the compiler
  inserts the collectives), see DESIGN.md §3.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  model = int(mesh_cfg.model)
  data = int(mesh_cfg.data)
  if model < 1 or n % model:
    raise ConfigError(f"mesh.model={model} must be >= 1 and divide the {n} devices")
  if data == -1:
    data = n // model
  if data * model != n:
    raise ConfigError(f"mesh.data={data} x mesh.model={model} = {data * model} but there are "
                      f"{n} devices; set them so that the product is {n} (data=-1 fills in)")
  grid = np.asarray(devices).reshape(data, model)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', replicated over 'model'."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_to_shardings(specs, mesh: Mesh):
  """Tree of logical PartitionSpecs (from nn.get_partition_spec) -> NamedShardings."""
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)
