"""PEPNet: parameter and embedding personalized network (Chang et al., KDD 2023).

  x      = concat(flatten(embeddings), dense)
  EPNet:  x' = x ⊙ GateNU_ep(C(s) ⊕ sg(x))                   scenario-personalised embeddings
  PPNet:  h_l = Layer_l(h_{l-1}) ⊙ GateNU_l(prior ⊕ sg(x')),   prior = E(user_id) ⊕ E(item_id) ⊕ C(s)
  logit = Dense(h_L)

GateNU(z) = γ·sigmoid(W2 relu(W1 z)) with γ = 2, so a gate starts near 1 (neutral) and can
amplify as well as damp. sg = stop-gradient: the gates read the embeddings but must not
train them, otherwise the embeddings learn to please the gate instead of the task.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mscenario.errors import ConfigError
from mscenario.models.embedding import embed_batch
from mscenario.models.base import ScenarioModel
from mscenario.models.layers import get_dtype
from mscenario.models.registry import register

SCENARIO_INIT = nn.initializers.normal(stddev=0.05)


class GateNU(nn.Module):
  """Gate neural unit: gamma * sigmoid(Dense(relu(Dense(z)))) -> [B, out_dim] float32."""
  out_dim: int
  hidden_dim: Optional[int] = None
  gamma: float = 2.0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    dt = get_dtype(self.dtype)
    h = nn.Dense(self.hidden_dim or self.out_dim, dtype=dt, param_dtype=jnp.float32)(z)
    g = nn.Dense(self.out_dim, dtype=dt, param_dtype=jnp.float32)(nn.relu(h))
    return self.gamma * nn.sigmoid(g.astype(jnp.float32))


@register("pepnet")
class PEPNet(ScenarioModel):
  """EPNet gate on the input layer, one PPNet gate per hidden layer of MLP(`hidden`) -> 1.

  `prior_features` name the personal-prior features (default: 'user_id' and 'item_id', or
  the first two sparse features when those names are absent).
  """
  gate_gamma: float = 2.0
  prior_features: tuple = ()

  def validate(self) -> None:
    self.prior_index()

  def prior_index(self) -> np.ndarray:
    """Indices (into the embedded fields) of the user / item prior features."""
    names = [f.name for f in (*self.schema.sparse, *self.schema.multi)]
    wanted = tuple(self.prior_features)
    if wanted:
      unknown = sorted(set(wanted) - set(names))
      if unknown:
        raise ConfigError(f"model.pepnet.prior_features: unknown features {unknown} "
                          f"(known: {names})")
      return np.asarray([names.index(n) for n in wanted], np.int32)
    by_name = [names.index(n) for n in ("user_id", "item_id") if n in names]
    if len(by_name) == 2:
      return np.asarray(by_name, np.int32)
    return np.arange(min(2, len(self.schema.sparse)), dtype=np.int32)

  @nn.compact
  def __call__(self, batch: dict, train: bool = False) -> jax.Array:
    emb, dense = embed_batch(self.schema, self.embed_dim, self.embed_init_std, batch)
    b = emb.shape[0]
    scenario = batch["scenario"].astype(jnp.int32)
    x = jnp.concatenate([emb.reshape(b, -1), dense], axis=1)
    table = self.param("scenario_embedding", SCENARIO_INIT,
                       (self.num_scenarios, self.embed_dim), jnp.float32)
    scen = jnp.take(table, scenario, axis=0)

    # EPNet: personalise the embedding layer by scenario.
    ep_in = jnp.concatenate([scen, jax.lax.stop_gradient(x)], axis=1)
    x = x * GateNU(x.shape[-1], gamma=self.gate_gamma, dtype=self.dtype, name="ep_gate")(ep_in)

    # PPNet: personalise every hidden layer by the user / item priors and the scenario.
    prior = emb[:, self.prior_index()].reshape(b, -1)
    pp_in = jnp.concatenate([prior, scen, jax.lax.stop_gradient(x)], axis=1)
    h = x.astype(self.compute_dtype)
    for i, width in enumerate(self.hidden):
      h = self.mlp((width,), name=f"layer_{i}")(h, train)
      gate = GateNU(width, gamma=self.gate_gamma, dtype=self.dtype, name=f"pp_gate_{i}")(pp_in)
      h = h * gate.astype(h.dtype)
    out = nn.Dense(1, dtype=self.compute_dtype, param_dtype=jnp.float32, name="output")(h)
    return out[:, 0].astype(jnp.float32)
