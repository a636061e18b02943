"""MMoE: shared experts, one softmax gate and one tower per scenario (Ma et al., KDD 2018)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mscenario.models.layers import ScenarioModel, select_scenario, stacked
from mscenario.models.registry import register


@register("mmoe")
class MMoE(ScenarioModel):
  """`num_experts` MLP(`expert_hidden`) experts shared by all scenarios; scenario s mixes
  them with its own gate softmax(W_s x) and scores the mixture with its own tower."""
  num_experts: int = 4
  expert_hidden: Sequence[int] = (256,)
  tower_hidden: Sequence[int] = (64,)

  @nn.compact
  def __call__(self, batch: dict, train: bool = False) -> jax.Array:
    x = self.inputs(batch)
    s, e = self.num_scenarios, self.num_experts
    experts = self.stacked_mlp(e, self.expert_hidden, name="experts")
    expert_out = experts(jnp.broadcast_to(x, (e,) + x.shape), train)  # [E, B, H]
    gates = stacked(nn.Dense, s, takes_train=False)(e, dtype=self.compute_dtype, param_dtype=jnp.float32,
                                 name="gates")
    gate = nn.softmax(gates(jnp.broadcast_to(x, (s,) + x.shape)).astype(jnp.float32))
    mixed = jnp.einsum("sbe,ebh->sbh", gate.astype(expert_out.dtype), expert_out)
    towers = self.stacked_mlp(s, self.tower_hidden, output_dim=1, name="towers")
    logits = towers(mixed, train)[..., 0]  # [S, B]
    return select_scenario(logits.T, batch["scenario"]).astype(jnp.float32)
