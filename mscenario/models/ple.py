"""PLE: progressive layered extraction (Tang et al., RecSys 2020) with scenarios as tasks."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mscenario.models.layers import MLP, ScenarioModel, get_dtype, select_scenario, stacked
from mscenario.models.registry import register


class CGC(nn.Module):
  """One customized-gate-control layer.

  inputs [S+1, B, in]: one input per scenario plus the shared branch's (last). Scenario s
  gates over its own `specific` experts and the `shared` experts; unless this is the last
  layer, a shared gate over all experts produces the shared branch's next input.
  Returns [S+1, B, H] (or [S, B, H] for the last layer).
  """
  num_scenarios: int
  specific: int
  shared: int
  expert_hidden: Sequence[int]
  last: bool
  activation: str = "relu"
  dropout: float = 0.0
  dtype: str = "float32"
  batch_norm: bool = False

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
    s, k, m = self.num_scenarios, self.specific, self.shared
    mlp_args = (tuple(self.expert_hidden), self.activation, self.dropout, self.dtype,
                self.batch_norm)
    cdt = get_dtype(self.dtype)
    # Specific experts: scenario s's k experts see scenario s's input; stacked as [S*k].
    spec_in = jnp.repeat(inputs[:s], k, axis=0)
    spec = stacked(MLP, s * k)(*mlp_args, name="specific_experts")(spec_in, train)
    spec = spec.reshape((s, k) + spec.shape[1:])                   # [S, k, B, H]
    shared_in = jnp.broadcast_to(inputs[s], (m,) + inputs.shape[1:])
    shared = stacked(MLP, m)(*mlp_args, name="shared_experts")(shared_in, train)  # [m, B, H]
    gates = stacked(nn.Dense, s, takes_train=False)(
        k + m, dtype=cdt, param_dtype=jnp.float32, name="gates")
    gate = nn.softmax(gates(inputs[:s]).astype(jnp.float32)).astype(spec.dtype)  # [S, B, k+m]
    out = (jnp.einsum("sbk,skbh->sbh", gate[..., :k], spec)
           + jnp.einsum("sbm,mbh->sbh", gate[..., k:], shared))
    if self.last:
      return out
    shared_gate = nn.Dense(s * k + m, dtype=cdt, param_dtype=jnp.float32, name="shared_gate")
    g = nn.softmax(shared_gate(inputs[s]).astype(jnp.float32)).astype(spec.dtype)  # [B, S*k+m]
    all_experts = jnp.concatenate([spec.reshape((s * k,) + spec.shape[2:]), shared], axis=0)
    shared_out = jnp.einsum("be,ebh->bh", g, all_experts)
    return jnp.concatenate([out, shared_out[None]], axis=0)


@register("ple")
class PLE(ScenarioModel):
  """`ple_layers` CGC layers, then one MLP(`tower_hidden`) -> 1 tower per scenario."""
  ple_layers: int = 1
  shared_experts: int = 2
  specific_experts: int = 1
  expert_hidden: Sequence[int] = (256,)
  tower_hidden: Sequence[int] = (64,)

  @nn.compact
  def __call__(self, batch: dict, train: bool = False) -> jax.Array:
    x = self.inputs(batch)
    s = self.num_scenarios
    h = jnp.broadcast_to(x, (s + 1,) + x.shape)
    for i in range(self.ple_layers):
      h = CGC(s, self.specific_experts, self.shared_experts, tuple(self.expert_hidden),
              last=i == self.ple_layers - 1, activation=self.activation, dropout=self.dropout,
              dtype=self.dtype, batch_norm=self.batch_norm, name=f"cgc_{i}")(h, train)
    towers = self.stacked_mlp(s, self.tower_hidden, output_dim=1, name="towers")
    logits = towers(h, train)[..., 0]  # [S, B]
    return select_scenario(logits.T, batch["scenario"]).astype(jnp.float32)
