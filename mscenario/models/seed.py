"""The seed model: Interest(u, i, s) = f(E(u), E(i), C(s)) (DESIGN.md §1).

User-side and item-side features each go through their own ReLU encoder; the two codes are
concatenated with a learned scenario context vector C(s) and scored by an MLP.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mscenario.errors import ConfigError
from mscenario.models.embedding import embed_batch
from mscenario.models.base import ScenarioModel
from mscenario.models.registry import register

# Feature names that describe the user even though they do not start with 'user'.
USER_SIDE_NAMES = frozenset(
    {"gender", "occupation", "zip_code", "zip", "age_bucket", "age", "region"})

SCENARIO_INIT = nn.initializers.normal(stddev=0.05)


def is_user_side(name: str) -> bool:
  """Default grouping by name; 'x__missing' indicator columns follow their feature 'x'."""
  base = name.split("__")[0]
  return base.startswith("user") or base in USER_SIDE_NAMES


@register("seed")
class Seed(ScenarioModel):
  """Encoders MLP(`hidden`) per side, C(s) of size embed_dim, head MLP(`tower_hidden`) -> 1.

  `user_features` / `item_features` name the features of each side; empty = by name
  (`is_user_side`) for the user side and everything else for the item side. If both are
  given, features in neither list are not used.
  """
  tower_hidden: Sequence[int] = (64,)
  user_features: Sequence[str] = ()
  item_features: Sequence[str] = ()

  def validate(self) -> None:
    self.sides()

  def sides(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((user embedded idx, user dense idx), (item embedded idx, item dense idx))."""
    embedded = [f.name for f in (*self.schema.sparse, *self.schema.multi)]
    dense = list(self.schema.dense)
    known = set(embedded) | {n.split("__")[0] for n in dense}
    for key, names in (("user_features", self.user_features),
                       ("item_features", self.item_features)):
      unknown = sorted(set(names) - known)
      if unknown:
        raise ConfigError(f"model.seed.{key}: unknown features {unknown} (known: {sorted(known)})")
    both = sorted(set(self.user_features) & set(self.item_features))
    if both:
      raise ConfigError(f"model.seed.user_features and .item_features both list {both}")
    user = (set(self.user_features) if self.user_features
            else {n for n in known if is_user_side(n)} - set(self.item_features))
    item = set(self.item_features) if self.item_features else known - user

    def pick(group):
      return (np.asarray([i for i, n in enumerate(embedded) if n in group], np.int32),
              np.asarray([i for i, n in enumerate(dense) if n.split("__")[0] in group],
                         np.int32))
    return pick(user), pick(item)

  @nn.compact
  def __call__(self, batch: dict, train: bool = False) -> jax.Array:
    emb, dense = embed_batch(self.schema, self.embed_dim, self.embed_init_std, batch)
    b = emb.shape[0]
    codes = []
    # Columns past the data's own dense features are the behaviour-history summary
    # (embedding.embed_batch): user behaviour, so they join the user side.
    extra = dense[:, len(self.schema.dense):]
    for side, (emb_idx, dense_idx) in zip(("user", "item"), self.sides()):
      x = jnp.concatenate([emb[:, emb_idx].reshape(b, -1), dense[:, dense_idx]]
                          + ([extra] if side == "user" else []), axis=1)
      codes.append(self.mlp(self.hidden, name=f"{side}_encoder")(x, train))
    context = self.param("scenario_context", SCENARIO_INIT,
                         (self.num_scenarios, self.embed_dim), jnp.float32)
    codes.append(jnp.take(context, batch["scenario"], axis=0).astype(codes[0].dtype))
    h = jnp.concatenate(codes, axis=1)
    logit = self.mlp(self.tower_hidden, output_dim=1, name="head")(h, train)[:, 0]
    return logit.astype(jnp.float32)
