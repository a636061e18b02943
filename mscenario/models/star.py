"""STAR: star-topology adaptive recommender (Sheng et al., CIKM 2021).

  x  = concat(flatten(embeddings), dense)
  x' = PartitionedNorm(x, s)                         statistics and scale/bias per scenario
                                                     (model.batch_norm=false: per example)
  h  = FCN_s(x'), layer l: W_l ⊙ W_{l,s}, b_l + b_{l,s}   shared ⊙ scenario-specific weights
  logit = h + Aux(concat(C(s), x))                   auxiliary network sees the scenario

Scenario weights start at ones and scenario biases near zero, so every scenario starts from
the shared network and learns multiplicative/additive corrections.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mscenario.errors import ConfigError
from mscenario.models.base import ScenarioModel
from mscenario.models.layers import get_activation, get_dtype, pack_by_scenario
from mscenario.models.registry import register

SCENARIO_INIT = nn.initializers.normal(stddev=0.05)
SCENARIO_BIAS_INIT = nn.initializers.normal(stddev=0.01)
_HI = jax.lax.Precision.HIGHEST


class PartitionedNorm(nn.Module):
  """Batch normalisation with per-scenario statistics and scale = γ ⊙ γ_s, bias = β + β_s.

  Training: each row is normalised with the mean/variance of the rows of ITS scenario in
  the batch (masked per-scenario moments), so one scenario's feature distribution never
  moves another's normalised inputs. The per-scenario running averages live in
  `batch_stats` ('mean', 'var', [S, D]); a scenario absent from a batch keeps its running
  values. Eval (train=False) normalises with those running averages.

  per_example=True (STAR with model.batch_norm=false, and so under differential privacy):
  each row is normalised over its own features (LayerNorm-style: no batch statistics, no
  `batch_stats`), then scaled and shifted by the same shared ⊙ scenario-specific scale/bias.
  Batch statistics mix the rows of a batch, so one example would move every other example's
  gradient and per-example clipping would bound nothing; per-example normalisation keeps
  each row's output a function of that row alone.
  """
  num_scenarios: int
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: str = "float32"
  per_example: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, scenario: jax.Array, train: bool = False) -> jax.Array:
    s, d = self.num_scenarios, x.shape[-1]
    x = x.astype(jnp.float32)
    if self.per_example:
      centered = x - x.mean(axis=-1, keepdims=True)
      var = (centered * centered).mean(axis=-1, keepdims=True)
      return self._scale(centered * jax.lax.rsqrt(var + self.epsilon), scenario, s, d)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((s, d), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((s, d), jnp.float32))
    if train:
      onehot = jax.nn.one_hot(scenario, s, dtype=jnp.float32)       # [B, S]
      count = onehot.sum(axis=0)                                      # [S]
      denom = jnp.maximum(count, 1.0)[:, None]
      mean = jnp.einsum("bs,bd->sd", onehot, x, precision=_HI) / denom
      centered = x - jnp.take(mean, scenario, axis=0)
      var = jnp.einsum("bs,bd->sd", onehot, centered * centered, precision=_HI) / denom
      if not self.is_initializing():
        present = (count > 0)[:, None]
        m = self.momentum
        ra_mean.value = jnp.where(present, m * ra_mean.value + (1 - m) * mean, ra_mean.value)
        ra_var.value = jnp.where(present, m * ra_var.value + (1 - m) * var, ra_var.value)
    else:
      mean, var = ra_mean.value, ra_var.value
      centered = x - jnp.take(mean, scenario, axis=0)
    y = centered * jax.lax.rsqrt(jnp.take(var, scenario, axis=0) + self.epsilon)
    return self._scale(y, scenario, s, d)

  def _scale(self, y: jax.Array, scenario: jax.Array, s: int, d: int) -> jax.Array:
    """y * (γ ⊙ γ_s) + (β + β_s) of each row's scenario s."""
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    scenario_scale = self.param("scenario_scale", nn.initializers.ones, (s, d), jnp.float32)
    scenario_bias = self.param("scenario_bias", nn.initializers.zeros, (s, d), jnp.float32)
    y = (y * (scale * jnp.take(scenario_scale, scenario, axis=0))
         + (bias + jnp.take(scenario_bias, scenario, axis=0)))
    return y.astype(get_dtype(self.dtype))


class StarLayer(nn.Module):
  """Params of one star FCN layer: __call__ returns the effective per-scenario (kernel,
  bias); `matmul` applies all of them (the dense path), a method of its own so that
  DP-SGD's ghost norms (train/ghost.py) can see the layer's input and output."""
  num_scenarios: int
  in_dim: int
  out_dim: int

  def setup(self):
    s = self.num_scenarios
    self.kernel = self.param("kernel", nn.initializers.he_uniform(),
                             (self.in_dim, self.out_dim), jnp.float32)
    self.bias = self.param("bias", nn.initializers.zeros, (self.out_dim,), jnp.float32)
    self.scenario_kernel = self.param("scenario_kernel", nn.initializers.ones,
                                      (s, self.in_dim, self.out_dim), jnp.float32)
    # Small random scenario biases break the symmetry between scenarios at init (the
    # benchmark draws them at random too); the kernels start exactly at the shared ones.
    self.scenario_bias = self.param("scenario_bias", SCENARIO_BIAS_INIT,
                                    (s, self.out_dim), jnp.float32)

  def __call__(self) -> tuple[jax.Array, jax.Array]:
    return (self.kernel[None] * self.scenario_kernel,
            self.bias[None] + self.scenario_bias)  # [S, in, out], [S, out]

  def matmul(self, h: jax.Array, dtype) -> jax.Array:
    """h [S, B, in] (scenario s's input on axis 0) -> [S, B, out], every scenario's layer."""
    kernel, bias = self()
    return jnp.einsum("sbi,sio->sbo", h, kernel.astype(dtype)) + bias[:, None, :].astype(dtype)


@register("star")
class Star(ScenarioModel):
  """STAR with FCN widths `hidden` (+ a final width-1 layer) and Aux MLP(`aux_hidden`) -> 1.

  scenario_matmul='grouped' packs rows into scenario-pure chunks so each row pays for one
  scenario's FCN (~3x faster on CPU for 3 scenarios); 'dense' computes all S FCNs on every
  row and selects, which avoids the batch-wide packing (simpler under data sharding).
  Both give the same logits (dropout masks aside). model.batch_norm=false removes batch
  statistics everywhere: the aux MLP has no BatchNorm and the partitioned normalisation
  normalises each row over its own features (PartitionedNorm.per_example), as DP needs.
  """
  aux_hidden: Sequence[int] = (64,)
  scenario_matmul: str = "grouped"

  def validate(self) -> None:
    if self.scenario_matmul not in ("grouped", "dense"):
      raise ConfigError(
          f"model.star.scenario_matmul={self.scenario_matmul!r}: expected 'grouped' or 'dense'")

  @nn.compact
  def __call__(self, batch: dict, train: bool = False) -> jax.Array:
    self.validate()
    s = self.num_scenarios
    scenario = batch["scenario"].astype(jnp.int32)
    x = self.inputs(batch)
    dt = self.compute_dtype
    act = get_activation(self.activation)
    h = PartitionedNorm(s, dtype=self.dtype, per_example=not self.batch_norm,
                        name="partitioned_norm")(x, scenario, train)

    dims = (*self.hidden, 1)
    layers, in_dim = [], x.shape[-1]
    for i, out_dim in enumerate(dims):
      layers.append(StarLayer(s, in_dim, out_dim, name=f"fcn_{i}"))
      in_dim = out_dim

    def run(h, layer_fn):
      # h [G, R, in]: G groups of rows; layer_fn(layer, h) applies one FCN layer.
      for i, layer in enumerate(layers):
        h = layer_fn(layer, h)
        if i < len(layers) - 1:
          h = act(h)
          if self.dropout > 0:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
      return h

    if self.scenario_matmul == "grouped":
      # groups share one scenario each: pick(W [S, ...]) -> W [G, ...]
      packing = pack_by_scenario(scenario, s)
      pick = lambda w: jnp.take(w, packing.chunk_scenario, axis=0)  # noqa: E731

      def grouped(layer, h):
        kernel, bias = layer()
        return (jnp.einsum("gri,gio->gro", h, pick(kernel).astype(dt))
                + pick(bias)[:, None, :].astype(dt))

      main = packing.unpack(run(packing.pack(h), grouped))[:, 0]
    else:
      out = run(jnp.broadcast_to(h, (s,) + h.shape),
                lambda layer, h: layer.matmul(h, dt))  # [S, B, 1]
      main = jnp.take_along_axis(out[..., 0].T, scenario[:, None], axis=1)[:, 0]

    context = self.param("scenario_context", SCENARIO_INIT, (s, self.embed_dim), jnp.float32)
    aux_in = jnp.concatenate([jnp.take(context, scenario, axis=0), x], axis=1)
    aux = self.mlp(self.aux_hidden, output_dim=1, name="aux")(aux_in, train)[:, 0]
    return main.astype(jnp.float32) + aux.astype(jnp.float32)
