"""PLE: progressive layered extraction (Tang et al., RecSys 2020) with scenarios as tasks."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mscenario.models.base import ScenarioModel
from mscenario.models.layers import (StackedDense, StackedMLP, get_dtype, mix,
                                     select_scenario)
from mscenario.models.registry import register


class CGC(nn.Module):
  """One customized-gate-control layer.

  inputs: [B, in] when every branch reads the same x (the first layer), else [S+1, B, in]:
  one input per scenario plus the shared branch's (last). Scenario s gates over its own
  `specific` experts and the `shared` experts; unless this is the last layer, a shared gate
  over all experts produces the shared branch's next input.
  Returns [S+1, B, H] (or [S, B, H] for the last layer).

  Experts and gates are StackedMLP / StackedDense (params as vmapped copies: specific
  experts [S*k, ...], copy s*k+j belonging to scenario s; gates [S, ...]): when they read one
  input (x in the first layer; the shared branch's always) each is one wide matmul.
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
    one_input = inputs.ndim == 2
    # Specific experts: copy s*k+j is scenario s's j-th and reads scenario s's input.
    spec_in = inputs if one_input else jnp.repeat(inputs[:s], k, axis=0)
    shared_in = inputs if one_input else inputs[s]
    spec = StackedMLP(s * k, *mlp_args, name="specific_experts")(spec_in, train)
    shared = StackedMLP(m, *mlp_args, name="shared_experts")(shared_in, train)  # [B, m, H]
    gates = StackedDense(s, k + m, dtype=cdt, name="gates")(inputs if one_input else inputs[:s])
    if one_input:  # [B, S*k, H] / [B, S, k+m] -> scenario-major
      b, h = spec.shape[0], spec.shape[-1]
      spec = jnp.transpose(spec.reshape(b, s, k, h), (1, 2, 0, 3))      # [S, k, B, H]
      gates = jnp.transpose(gates, (1, 0, 2))
    else:
      spec = spec.reshape((s, k) + spec.shape[1:])                       # [S, k, B, H]
    gate = nn.softmax(gates.astype(jnp.float32)).astype(spec.dtype)     # [S, B, k+m]
    shared_list = [shared[:, i] for i in range(m)]
    out = mix(gate[..., k:], shared_list)                                # [S, B, H]
    own = jnp.stack([mix(gate[i, None, :, :k], [spec[i, j] for j in range(k)])[0]
                     for i in range(s)])                                 # own experts
    out = out + own
    if self.last:
      return out
    shared_gate = nn.Dense(s * k + m, dtype=cdt, param_dtype=jnp.float32, name="shared_gate")
    g = nn.softmax(shared_gate(shared_in).astype(jnp.float32)).astype(spec.dtype)  # [B, S*k+m]
    all_experts = [spec[i // k, i % k] for i in range(s * k)] + shared_list
    shared_out = mix(g[None], all_experts)                               # [1, B, H]
    return jnp.concatenate([out, shared_out], axis=0)


@register("ple")
class PLE(ScenarioModel):
  """`ple_layers` CGC layers, then one MLP(`tower_hidden`) -> 1 tower per scenario (every
  tower on every row, BatchNorm statistics over the whole batch; each row keeps its own)."""
  ple_layers: int = 1
  shared_experts: int = 2
  specific_experts: int = 1
  expert_hidden: Sequence[int] = (192,)
  tower_hidden: Sequence[int] = (32,)

  @nn.compact
  def __call__(self, batch: dict, train: bool = False) -> jax.Array:
    h = self.inputs(batch)  # [B, F]: every branch of the first layer reads x
    s = self.num_scenarios
    for i in range(self.ple_layers):
      h = CGC(s, self.specific_experts, self.shared_experts, tuple(self.expert_hidden),
              last=i == self.ple_layers - 1, activation=self.activation, dropout=self.dropout,
              dtype=self.dtype, batch_norm=self.batch_norm, name=f"cgc_{i}")(h, train)
    towers = self.parallel_mlps(s, self.tower_hidden, output_dim=1, name="towers")
    logits = towers(h, train)[..., 0]  # [S, B]
    return select_scenario(logits.T, batch["scenario"]).astype(jnp.float32)
