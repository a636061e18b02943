"""One stacked embedding table for every sparse and multi-valued feature.

Stacking the per-feature tables (rows of feature k start at `schema.embedding_offsets[k]`)
turns a step's lookups into ONE gather, the layout TorchRec and the TPU embedding libraries
use, and gives the trainer one array to row-shard (logical axes ('vocab', 'embed')).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mscenario.data.schema import PAD_ID, FeatureSchema

EMBED_AXES = ("vocab", "embed")


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
  """Rows of `table` for global ids (any shape) -> ids.shape + [embed_dim].

  Kept as the single place that touches the table so a sparse-update path can replace it.
  Out-of-range ids read NaN ("fill" mode), so a vocabulary bug is loud instead of silent.
  """
  return jnp.take(table, ids, axis=0)


def stacked_ids(schema: FeatureSchema, sparse: jax.Array, multi: jax.Array) -> jax.Array:
  """Local per-feature ids -> global row ids [B, S + M*L] in the stacked table."""
  offsets = np.asarray(schema.embedding_offsets, dtype=np.int32)
  n_sparse = len(schema.sparse)
  b = sparse.shape[0]
  sparse_ids = sparse.astype(jnp.int32) + offsets[:n_sparse]
  multi_ids = multi.astype(jnp.int32) + offsets[n_sparse:, None]
  return jnp.concatenate([sparse_ids, multi_ids.reshape(b, -1)], axis=1)


class EmbeddingCollection(nn.Module):
  """Embeds batch['sparse'] and batch['multi'] -> [B, S + M, embed_dim].

  Multi-valued features are mean-pooled over their non-padding (id != 0) positions; a row
  with only padding gets zeros, so "no values" is distinct from any learned embedding.
  """
  schema: FeatureSchema
  embed_dim: int
  init_std: float = 1e-4

  @nn.compact
  def __call__(self, sparse: jax.Array, multi: jax.Array,
               rows: jax.Array | None = None) -> jax.Array:
    """`rows`: the already-gathered rows [B, S + M*L, E] of `stacked_ids` — the trainer's
    sparse-update path keeps the table outside the model and passes them in; the table
    param is then neither created nor read."""
    b = sparse.shape[0]
    n_sparse = sparse.shape[1]
    n_multi, max_len = multi.shape[1], multi.shape[2]
    if rows is None:
      table = self.param(
          "table",
          nn.with_logical_partitioning(nn.initializers.normal(stddev=self.init_std),
                                       EMBED_AXES),
          (self.schema.table_rows, self.embed_dim), jnp.float32)
      emb = lookup(table, stacked_ids(self.schema, sparse, multi))  # one gather
    else:
      emb = rows.astype(jnp.float32)
    sparse_emb = emb[:, :n_sparse]
    multi_emb = emb[:, n_sparse:].reshape(b, n_multi, max_len, self.embed_dim)
    mask = (multi != PAD_ID).astype(emb.dtype)[..., None]
    count = jnp.maximum(mask.sum(axis=2), 1.0)
    pooled = (multi_emb * mask).sum(axis=2) / count
    return jnp.concatenate([sparse_emb, pooled], axis=1)


def embed_batch(schema: FeatureSchema, embed_dim: int, init_std: float,
                batch: dict) -> tuple[jax.Array, jax.Array]:
  """(embeddings [B, F, E], dense [B, D]) for a batch; call inside a compact method.

  Creates the EmbeddingCollection under the name 'embedding' so every model's table lives
  at params['embedding']['table'] (the trainer gives that path its own optimizer). A
  `fusion.TextSchema` adds the language-model features (models/fusion.py) as extra or
  replaced feature slots, so every model gets them without knowing about text.
  """
  text = getattr(schema, "text", None)
  base = schema.base if text is not None else schema
  emb = EmbeddingCollection(base, embed_dim, init_std, name="embedding")(
      batch["sparse"], batch["multi"], batch.get("embedding_rows"))
  if text is not None:
    from mscenario.models.fusion import TextFusion
    emb = TextFusion(text, embed_dim, len(base.sparse), name="text_fusion")(emb, batch)
  return emb, batch["dense"].astype(jnp.float32)


def model_input(schema: FeatureSchema, embed_dim: int, init_std: float,
                batch: dict) -> jax.Array:
  """The flat model input x = concat(flatten(embeddings), dense) -> [B, F*E + D] float32."""
  emb, dense = embed_batch(schema, embed_dim, init_std, batch)
  return jnp.concatenate([emb.reshape(emb.shape[0], -1), dense], axis=1)
