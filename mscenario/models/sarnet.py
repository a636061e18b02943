"""SAR-Net: scenario-aware ranking network (Shen et al., CIKM 2021).

  x   = concat(flatten(embeddings), dense)
  x_s = x ⊙ w_s + b_s                                    scenario-specific transfer layer
  experts: M shared + k specific to the row's scenario, each MLP(expert_hidden)(x_s)
  a   = softmax(Dense(x_s ⊕ C(s)))  over the M + k experts    scenario-aware attention
  logit = Tower(Σ a_j expert_j) + Debias(C(s) ⊕ dense)   debias net: scenario-level bias

The debias network sees only scenario-level inputs, so scenario-wide offsets (position /
surface bias in the paper; here the age-group base rate) are absorbed there instead of
being entangled in the experts.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mscenario.models.base import ScenarioModel
from mscenario.models.registry import register

SCENARIO_INIT = nn.initializers.normal(stddev=0.05)


@register("sarnet")
class SARNet(ScenarioModel):
  """`shared_experts` shared and `specific_experts` per-scenario experts MLP(`expert_hidden`),
  one shared tower MLP(`tower_hidden`) -> 1, plus the debias logit."""
  shared_experts: int = 4
  specific_experts: int = 2
  expert_hidden: Sequence[int] = (64,)
  tower_hidden: Sequence[int] = (32,)
  debias_hidden: int = 16

  @nn.compact
  def __call__(self, batch: dict, train: bool = False) -> jax.Array:
    x = self.inputs(batch)
    dt = self.compute_dtype
    s, m, k = self.num_scenarios, self.shared_experts, self.specific_experts
    d = x.shape[-1]
    scenario = batch["scenario"].astype(jnp.int32)
    table = self.param("scenario_embedding", SCENARIO_INIT, (s, self.embed_dim), jnp.float32)
    scen = jnp.take(table, scenario, axis=0)

    # Scenario-specific transfer: starts as the identity for every scenario.
    scale = self.param("scenario_scale", nn.initializers.ones, (s, d), jnp.float32)
    shift = self.param("scenario_shift", nn.initializers.zeros, (s, d), jnp.float32)
    xs = (x * jnp.take(scale, scenario, axis=0) + jnp.take(shift, scenario, axis=0)).astype(dt)

    shared = self.stacked_mlp(m, self.expert_hidden, name="shared_experts")(
        jnp.broadcast_to(xs, (m,) + xs.shape), train)                          # [M, B, H]
    # Every row runs through all S*k specific experts and keeps its own scenario's k:
    # selecting (not weighting by zero) keeps other scenarios' experts out exactly.
    spec = self.stacked_mlp(s * k, self.expert_hidden, name="specific_experts")(
        jnp.broadcast_to(xs, (s * k,) + xs.shape), train)                      # [S*k, B, H]
    spec = _own_experts(spec, s, k, scenario)                                  # [k, B, H]
    experts = jnp.concatenate([shared, spec], axis=0)                          # [M+k, B, H]

    gate_in = jnp.concatenate([xs, scen.astype(dt)], axis=1)
    gate = nn.Dense(m + k, dtype=dt, param_dtype=jnp.float32, name="gate")(gate_in)
    gate = nn.softmax(gate.astype(jnp.float32), axis=-1).astype(experts.dtype)  # [B, M+k]
    mixed = jnp.einsum("bj,jbh->bh", gate, experts)
    main = self.mlp(self.tower_hidden, output_dim=1, name="tower")(mixed, train)[:, 0]

    debias_in = jnp.concatenate([scen, batch["dense"].astype(jnp.float32)], axis=1)
    hid = nn.relu(nn.Dense(self.debias_hidden, name="debias_hidden")(debias_in))
    debias = nn.Dense(1, name="debias_out")(hid)[:, 0]
    return main.astype(jnp.float32) + debias.astype(jnp.float32)


def _own_experts(spec: jax.Array, s: int, k: int, scenario: jax.Array) -> jax.Array:
  """[S*k, B, H] (scenario-major) -> [k, B, H]: row b's scenario's k expert outputs."""
  per_scenario = spec.reshape((s, k) + spec.shape[1:])           # [S, k, B, H]
  moved = jnp.moveaxis(per_scenario, 1, 0)                        # [k, S, B, H]
  idx = scenario.astype(jnp.int32)[None, None, :, None]
  return jnp.take_along_axis(moved, idx, axis=1)[:, 0]
