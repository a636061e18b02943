"""Shared-Bottom: one bottom MLP shared by all scenarios, one tower per scenario."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mscenario.models.base import ScenarioModel
from mscenario.models.layers import select_scenario
from mscenario.models.registry import register


@register("sharedbottom")
class SharedBottom(ScenarioModel):
  """Bottom MLP(`hidden`) shared; tower_s = MLP(`tower_hidden`) -> 1 for scenario s.

  All towers run on every row (towers are small; their BatchNorm statistics are over the
  whole batch) and each row keeps its own scenario's logit, so a tower's parameters only
  ever affect its own scenario's predictions. The towers all read the bottom's output, so
  their first layers are one wide matmul (StackedMLP; params as S vmapped copies).
  """
  hidden: Sequence[int] = (256,)
  tower_hidden: Sequence[int] = (32,)

  @nn.compact
  def __call__(self, batch: dict, train: bool = False) -> jax.Array:
    x = self.inputs(batch)
    h = self.mlp(self.hidden, name="bottom")(x, train)
    towers = self.parallel_mlps(self.num_scenarios, self.tower_hidden, output_dim=1,
                                name="towers")
    logits = towers(h, train)[..., 0]  # [B, S]
    return select_scenario(logits, batch["scenario"]).astype(jnp.float32)
