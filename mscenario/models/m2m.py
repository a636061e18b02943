"""M2M: multi-scenario meta learning with meta units (Zhang et al., WSDM 2022).

  tokens  = field embeddings (+ one token for the dense features) + field position
  z       = flatten(TransformerEncoder(tokens))                    feature interactions
  E_k     = Expert_k(z), k = 1..K                                  shared experts [B, K, d]
  S_s, T_s = MLP_S(C(s)), MLP_T(C(s))                              scenario / task knowledge
  meta unit MU_s(h) = leaky(h W(S_s) + b(S_s))                     W, b generated from S_s
  meta attention: a_k = softmax_k(v · MU_s^att([E_k ⊕ T_s])),  r = Σ_k a_k E_k
  meta tower: h_0 = r, h_l = leaky(h_{l-1} W_l(S_s) + b_l(S_s) + h_{l-1})
  logit = MLP(tower_hidden)(h_L) -> 1

The generated weights depend on the scenario only, so they are computed once per scenario
on the [S, E] scenario table (not per row), every row is run through all S meta units
(d is small) and keeps its own scenario's result: a scenario's embedding row can only ever
change that scenario's predictions.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mscenario.models.embedding import embed_batch
from mscenario.models.base import ScenarioModel
from mscenario.models.registry import register

SCENARIO_INIT = nn.initializers.normal(stddev=0.1)


def take_scenario(values: jax.Array, scenario: jax.Array) -> jax.Array:
  """values [S, B, ...] -> [B, ...], each row's own scenario's slice (exact, no mixing)."""
  idx = scenario.astype(jnp.int32).reshape((1, -1) + (1,) * (values.ndim - 2))
  return jnp.take_along_axis(values, idx, axis=0)[0]


class EncoderBlock(nn.Module):
  """Pre-LayerNorm Transformer block over feature tokens [B, T, E].

  Pre-LN keeps the raw embeddings on the residual path, so the tiny (1e-4) initial
  embeddings are not blown up by a normalisation before the experts see them.
  """
  heads: int
  ffn_dim: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    y = nn.LayerNorm(dtype=dt, param_dtype=jnp.float32)(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.heads, dtype=dt, param_dtype=jnp.float32, deterministic=True)(y, y)
    y = nn.LayerNorm(dtype=dt, param_dtype=jnp.float32)(x)
    y = nn.Dense(self.ffn_dim, dtype=dt, param_dtype=jnp.float32)(y)
    y = nn.Dense(x.shape[-1], dtype=dt, param_dtype=jnp.float32)(nn.gelu(y))
    return x + y


class MetaWeights(nn.Module):
  """Generates a layer's (kernel [S, in, out], bias [S, out]) from scenario reps [S, d].

  The kernel is scaled by 1/sqrt(in) so generated layers start at a standard init scale.
  """
  in_dim: int
  out_dim: int

  @nn.compact
  def __call__(self, rep: jax.Array) -> tuple[jax.Array, jax.Array]:
    s = rep.shape[0]
    kernel = nn.Dense(self.in_dim * self.out_dim, name="kernel_net")(rep)
    bias = nn.Dense(self.out_dim, name="bias_net")(rep)
    kernel = kernel.reshape(s, self.in_dim, self.out_dim) / math.sqrt(self.in_dim)
    return kernel, bias


@register("m2m")
class M2M(ScenarioModel):
  """`num_experts` experts MLP(`expert_hidden` + `meta_dim`), meta attention, a meta tower of
  `meta_tower_layers` generated residual layers, and MLP(`tower_hidden`) -> 1."""
  num_experts: int = 4
  expert_hidden: tuple = (256,)
  tower_hidden: tuple = (64,)
  meta_dim: int = 32
  meta_tower_layers: int = 2
  transformer_layers: int = 1
  transformer_heads: int = 2

  @nn.compact
  def __call__(self, batch: dict, train: bool = False) -> jax.Array:
    emb, dense = embed_batch(self.schema, self.embed_dim, self.embed_init_std, batch)
    dt = self.compute_dtype
    b, e = emb.shape[0], self.embed_dim
    scenario = batch["scenario"].astype(jnp.int32)
    leaky = lambda v: nn.leaky_relu(v, 0.1)  # noqa: E731

    # Feature interactions: a small Transformer over the field tokens.
    tokens = emb
    if dense.shape[-1] > 0:
      dense_token = nn.Dense(e, dtype=dt, param_dtype=jnp.float32, name="dense_token")(dense)
      tokens = jnp.concatenate([tokens, dense_token[:, None, :].astype(tokens.dtype)], axis=1)
    position = self.param("field_position", nn.initializers.normal(stddev=0.02),
                          tokens.shape[1:], jnp.float32)
    tokens = (tokens + position[None]).astype(dt)
    for i in range(self.transformer_layers):
      tokens = EncoderBlock(self.transformer_heads, 2 * e, self.dtype,
                            name=f"encoder_{i}")(tokens)
    z = tokens.reshape(b, -1)

    # Shared experts [K, B, d].
    k, d = self.num_experts, self.meta_dim
    experts = self.stacked_mlp(k, (*self.expert_hidden, d), name="experts")
    expert_out = experts(jnp.broadcast_to(z, (k,) + z.shape), train)

    # Scenario / task knowledge, computed on the scenario table [S, E] -> [S, d].
    table = self.param("scenario_embedding", SCENARIO_INIT,
                       (self.num_scenarios, e), jnp.float32)
    scen_rep = leaky(nn.Dense(d, name="scenario_mlp")(table))
    task_rep = leaky(nn.Dense(d, name="task_mlp")(table))

    # Meta attention over the experts.
    att_w, att_b = MetaWeights(2 * d, 2 * d, name="meta_attention")(scen_rep)
    v = self.param("attention_v", nn.initializers.normal(stddev=1.0 / math.sqrt(2 * d)),
                   (2 * d,), jnp.float32)
    ex = jnp.einsum("kbi,sio->skbo", expert_out, att_w[:, :d].astype(dt))   # expert half
    tk = jnp.einsum("si,sio->so", task_rep, att_w[:, d:])                    # task half
    hidden = leaky(ex + (tk + att_b)[:, None, None, :].astype(dt))           # [S, K, B, 2d]
    scores = jnp.einsum("skbo,o->sbk", hidden, v.astype(dt)).astype(jnp.float32)
    alpha = nn.softmax(take_scenario(scores, scenario), axis=-1)             # [B, K]
    h = jnp.einsum("bk,kbd->bd", alpha.astype(dt), expert_out)

    # Meta tower: generated residual layers.
    for i in range(self.meta_tower_layers):
      w, bias = MetaWeights(d, d, name=f"meta_tower_{i}")(scen_rep)
      all_s = jnp.einsum("bi,sio->sbo", h, w.astype(dt)) + bias[:, None, :].astype(dt)
      h = leaky(take_scenario(all_s, scenario) + h)

    out = self.mlp(self.tower_hidden, output_dim=1, name="tower")(h, train)
    return out[:, 0].astype(jnp.float32)
