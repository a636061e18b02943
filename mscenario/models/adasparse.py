"""AdaSparse: scenario-adaptive sparse structures (Yang et al., CIKM 2022).

  x_0 = concat(flatten(embeddings), dense)
  π_l = Pruner_l(C(s) ⊕ x_l)                     one weighting factor per neuron of layer l
  x_0 ← x_0 ⊙ π_0;  x_l = Layer_l(x_{l-1}) ⊙ π_l;  logit = Dense(x_L)

Pruner ('fusion' form): v = β·sigmoid(α·Dense(C(s) ⊕ x)), π = v where v ≥ ε else 0.
Neurons whose factor falls below ε are cut to exactly zero for that row, so each scenario
(and row) runs a sparse sub-network of the shared one; above ε, π in (ε, β) also rescales.

The paper's sparsity-ratio regulariser is not included (the Scenario-Wise Rec reference
implementation leaves it out too): the trainer's loss has no auxiliary terms. Neither is
its α annealing (+1e-4 per step there, ≈ +0.2 over a whole ML-1M run): α is a fixed
`pruner_alpha`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mscenario.models.base import ScenarioModel
from mscenario.models.layers import get_dtype
from mscenario.models.registry import register

SCENARIO_INIT = nn.initializers.normal(stddev=0.05)


class Pruner(nn.Module):
  """Per-neuron weighting factors [B, out_dim] (float32) from (scenario rep, layer input)."""
  out_dim: int
  alpha: float = 1.0
  beta: float = 2.0
  epsilon: float = 1e-2
  dtype: str = "float32"

  @nn.compact
  def __call__(self, scen: jax.Array, x: jax.Array) -> jax.Array:
    z = jnp.concatenate([scen.astype(x.dtype), x], axis=1)
    v = nn.Dense(self.out_dim, dtype=get_dtype(self.dtype), param_dtype=jnp.float32)(z)
    v = self.beta * nn.sigmoid(self.alpha * v.astype(jnp.float32))
    return jnp.where(v >= self.epsilon, v, 0.0)


@register("adasparse")
class AdaSparse(ScenarioModel):
  """MLP(`hidden`) -> 1 whose input and every hidden layer are scaled by a Pruner."""
  pruner_alpha: float = 1.0
  pruner_beta: float = 2.0
  pruner_epsilon: float = 1e-2

  def pruner(self, width: int, name: str) -> Pruner:
    return Pruner(width, self.pruner_alpha, self.pruner_beta, self.pruner_epsilon,
                  self.dtype, name=name)

  @nn.compact
  def __call__(self, batch: dict, train: bool = False) -> jax.Array:
    x = self.inputs(batch)
    scenario = batch["scenario"].astype(jnp.int32)
    table = self.param("scenario_embedding", SCENARIO_INIT,
                       (self.num_scenarios, self.embed_dim), jnp.float32)
    scen = jnp.take(table, scenario, axis=0)
    h = x * self.pruner(x.shape[-1], "pruner_0")(scen, x)
    h = h.astype(self.compute_dtype)
    for i, width in enumerate(self.hidden):
      h = self.mlp((width,), name=f"layer_{i}")(h, train)
      h = h * self.pruner(width, f"pruner_{i + 1}")(scen, h).astype(h.dtype)
    out = nn.Dense(1, dtype=self.compute_dtype, param_dtype=jnp.float32, name="output")(h)
    return out[:, 0].astype(jnp.float32)
