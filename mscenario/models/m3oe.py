"""M3oE: multi-domain multi-task mixture of experts (Zhang et al., SIGIR 2024), one task.

  x      = concat(flatten(embeddings), dense)
  star   = x (W ⊙ W_s) + b + b_s                           STAR-style scenario fusion
  z      = LNMLP(hidden[1:])(star) + LNMLP(hidden[-1])(x)   with a skip connection
  shared = Σ_k g_{s,k} Expert_k(z),  g_s = softmax(Gate_s(sg(z)))
  domain = β·D_s(z) + (1-β)/(S-1) Σ_{j≠s} D_j(z)           β = sigmoid(learned balance)
  logit  = Tower_s(shared + γ·domain)                       γ = sigmoid(learned weight)

LNMLP = Dense -> LayerNorm -> ReLU per width (the reference implementation's layers), so
rows never mix and each scenario's towers, gates and STAR weights touch only its rows.
Picked over HMoE because M3oE is part of the Scenario-Wise Rec benchmark (its
implementation and ML-1M protocol are the ones we compare against) and it combines the
two ideas the zoo already has (STAR weights, MMoE gates) with learned domain balancing.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mscenario.models.base import ScenarioModel
from mscenario.models.layers import get_dtype, stacked
from mscenario.models.m2m import take_scenario
from mscenario.models.registry import register

SCENARIO_BIAS_INIT = nn.initializers.normal(stddev=0.01)


class LNMLP(nn.Module):
  """Dense -> LayerNorm -> ReLU [-> Dropout] per width, then an optional linear output."""
  hidden: Sequence[int]
  dropout: float = 0.0
  dtype: str = "float32"
  output_dim: int = 0
  train: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt = get_dtype(self.dtype)
    for width in self.hidden:
      x = nn.Dense(width, dtype=dt, param_dtype=jnp.float32)(x)
      x = nn.relu(nn.LayerNorm(dtype=dt, param_dtype=jnp.float32)(x))
      if self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not self.train)(x)
    if self.output_dim:
      x = nn.Dense(self.output_dim, dtype=dt, param_dtype=jnp.float32)(x)
    return x


@register("m3oe")
class M3oE(ScenarioModel):
  """STAR layer hidden[0] + LNMLP(hidden[1:]), `num_experts` shared and one domain expert
  per scenario LNMLP(`expert_hidden`), per-scenario gates and towers (width = last expert
  width, as in the reference)."""
  hidden: Sequence[int] = (128, 64)
  num_experts: int = 4
  expert_hidden: Sequence[int] = (64, 32)
  balance_init: float = 1.0   # initial logit of the domain-balance and domain-expert weights

  @nn.compact
  def __call__(self, batch: dict, train: bool = False) -> jax.Array:
    x = self.inputs(batch)
    dt = self.compute_dtype
    s, e = self.num_scenarios, self.num_experts
    scenario = batch["scenario"].astype(jnp.int32)
    d, h1 = x.shape[-1], self.hidden[0]
    mlp_kw = dict(dropout=self.dropout, dtype=self.dtype, train=train)

    # STAR fusion: every scenario starts at the shared kernel (scenario factors = 1).
    kernel = self.param("star_kernel", nn.initializers.xavier_uniform(), (d, h1), jnp.float32)
    bias = self.param("star_bias", nn.initializers.zeros, (h1,), jnp.float32)
    s_kernel = self.param("star_scenario_kernel", nn.initializers.ones, (s, d, h1),
                          jnp.float32)
    s_bias = self.param("star_scenario_bias", SCENARIO_BIAS_INIT, (s, h1), jnp.float32)
    xd = x.astype(dt)
    star_all = (jnp.einsum("bd,sdh->sbh", xd, (kernel[None] * s_kernel).astype(dt))
                + (bias[None] + s_bias)[:, None, :].astype(dt))
    star = take_scenario(star_all, scenario)
    z = (LNMLP(tuple(self.hidden[1:]), name="star_mlp", **mlp_kw)(star)
         + LNMLP((self.hidden[-1],), name="skip", **mlp_kw)(xd))

    # Shared experts with per-scenario gates on sg(z) (the gates steer, they don't shape z).
    hidden = tuple(self.expert_hidden)
    shared = stacked(LNMLP, e, takes_train=False)(hidden, name="experts", **mlp_kw)(
        jnp.broadcast_to(z, (e,) + z.shape))                                  # [E, B, H]
    gates = stacked(nn.Dense, s, takes_train=False)(e, dtype=dt, param_dtype=jnp.float32,
                                                    name="gates")
    gz = jax.lax.stop_gradient(z)
    gate = take_scenario(gates(jnp.broadcast_to(gz, (s,) + gz.shape)), scenario)
    gate = nn.softmax(gate.astype(jnp.float32), axis=-1).astype(shared.dtype)  # [B, E]
    mixed = jnp.einsum("be,ebh->bh", gate, shared)

    # Domain experts, balanced between the row's own scenario and the others.
    domain = stacked(LNMLP, s, takes_train=False)(hidden, name="domain_experts", **mlp_kw)(
        jnp.broadcast_to(z, (s,) + z.shape))                                  # [S, B, H]
    bal = nn.sigmoid(self.param("domain_balance", nn.initializers.constant(self.balance_init),
                                (), jnp.float32))
    weight = nn.sigmoid(self.param("domain_weight", nn.initializers.constant(
        self.balance_init), (), jnp.float32))
    own = jax.nn.one_hot(scenario, s, dtype=jnp.float32)
    other = (1.0 - bal) / (s - 1) if s > 1 else 0.0
    mix = own * bal + (1.0 - own) * other if s > 1 else own                   # [B, S]
    fused = mixed + weight.astype(dt) * jnp.einsum("bs,sbh->bh", mix.astype(dt), domain)

    towers = stacked(LNMLP, s, takes_train=False)((hidden[-1],), output_dim=1, name="towers",
                                                  **mlp_kw)
    logits = towers(jnp.broadcast_to(fused, (s,) + fused.shape))[..., 0]     # [S, B]
    return take_scenario(logits, scenario).astype(jnp.float32)
