"""MMoE: shared experts, one softmax gate and one tower per scenario (Ma et al., KDD 2018)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mscenario.models.base import ScenarioModel
from mscenario.models.layers import StackedDense, mix, select_scenario
from mscenario.models.registry import register


@register("mmoe")
class MMoE(ScenarioModel):
  """`num_experts` MLP(`expert_hidden`) experts shared by all scenarios; scenario s mixes
  them with its own gate softmax(W_s x) and scores the mixture with its own tower.

  Every tower runs on every row (its BatchNorm statistics are over the whole batch) and each
  row keeps its own scenario's logit. The experts and the gates all read x, so each is one
  wide matmul (StackedMLP / StackedDense; params as vmapped copies, [E, ...] / [S, ...]).
  """
  num_experts: int = 4
  expert_hidden: Sequence[int] = (256,)
  tower_hidden: Sequence[int] = (64,)

  @nn.compact
  def __call__(self, batch: dict, train: bool = False) -> jax.Array:
    x = self.inputs(batch)
    s, e = self.num_scenarios, self.num_experts
    expert_out = self.parallel_mlps(e, self.expert_hidden, name="experts")(x, train)  # [B, E, H]
    gates = StackedDense(s, e, dtype=self.compute_dtype, name="gates")(x)            # [B, S, E]
    gate = nn.softmax(gates.astype(jnp.float32)).astype(expert_out.dtype)
    mixed = mix(jnp.transpose(gate, (1, 0, 2)), [expert_out[:, i] for i in range(e)])  # [S, B, H]
    towers = self.parallel_mlps(s, self.tower_hidden, output_dim=1, name="towers")
    logits = towers(mixed, train)[..., 0]  # [S, B]
    return select_scenario(logits.T, batch["scenario"]).astype(jnp.float32)
