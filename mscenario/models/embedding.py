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
from mscenario.errors import ConfigError
from mscenario.models.fusion import TextFusion
from mscenario.models.sequence import SequenceEncoder

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


def data_schema(schema: FeatureSchema) -> FeatureSchema:
  """The data set's own schema (a fusion.TextSchema wraps it as `.base`)."""
  return getattr(schema, "base", None) or schema


def batch_ids(schema: FeatureSchema, batch: dict) -> jax.Array:
  """Every table row a batch reads: sparse, multi-valued, then history item ids."""
  base = data_schema(schema)
  ids = stacked_ids(base, batch["sparse"], batch["multi"])
  if base.history_length and "hist_item" in batch:
    offset = base.embedding_offsets[base.history_item_index]
    ids = jnp.concatenate([ids, batch["hist_item"].astype(jnp.int32) + offset], axis=1)
  return ids


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
               rows: jax.Array | None = None, hist_item: jax.Array | None = None):
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
      ids = stacked_ids(self.schema, sparse, multi)
      if hist_item is not None:
        offset = self.schema.embedding_offsets[self.schema.history_item_index]
        ids = jnp.concatenate([ids, hist_item.astype(jnp.int32) + offset], axis=1)
      emb = lookup(table, ids)  # one gather
    else:
      emb = rows.astype(jnp.float32)
    end = n_sparse + n_multi * max_len
    sparse_emb = emb[:, :n_sparse]
    multi_emb = emb[:, n_sparse:end].reshape(b, n_multi, max_len, self.embed_dim)
    mask = (multi != PAD_ID).astype(emb.dtype)[..., None]
    count = jnp.maximum(mask.sum(axis=2), 1.0)
    pooled = (multi_emb * mask).sum(axis=2) / count
    out = jnp.concatenate([sparse_emb, pooled], axis=1)
    if hist_item is None:
      return out
    # History rows, zeroed at padding so the encoder never sees the PAD row's values.
    return out, emb[:, end:] * (hist_item != PAD_ID)[..., None]


def embed_batch(schema: FeatureSchema, embed_dim: int, init_std: float,
                batch: dict) -> tuple[jax.Array, jax.Array]:
  """(embeddings [B, F, E], dense [B, D]) for a batch; call inside a compact method.

  Creates the EmbeddingCollection under the name 'embedding' so every model's table lives
  at params['embedding']['table'] (the trainer gives that path its own optimizer). A
  `fusion.TextSchema` adds the language-model features (models/fusion.py) as extra or
  replaced feature slots, so every model gets them without knowing about text.
  """
  text = getattr(schema, "text", None)
  base = data_schema(schema)
  hist = batch.get("hist_item") if (base.history_length and schema.sequence) else None
  out = EmbeddingCollection(base, embed_dim, init_std, name="embedding")(
      batch["sparse"], batch["multi"], batch.get("embedding_rows"), hist)
  emb, hist_emb = out if hist is not None else (out, None)
  if text is not None:
    emb, affinity = TextFusion(text, embed_dim, len(base.sparse), name="text_fusion")(emb,
                                                                                     batch)
  dense = batch["dense"].astype(jnp.float32)
  if text is not None:
    dense = jnp.concatenate([dense, affinity], axis=1)  # history content affinity (or [B, 0])
  if hist is not None:
    # The behaviour sequence joins as extra dense columns (after the data's own), so every
    # model that reads `dense` gets it; the candidate item asks the history what matters.
    kind, layers, heads, width, stats = (tuple(schema.sequence) + (True,))[:5]
    summary = SequenceEncoder(base.num_scenarios, width=width, layers=layers, heads=heads,
                              kind=kind, stats=bool(stats), name="sequence")(
        hist_emb, batch["hist_scenario"], batch["hist_feedback"], batch["hist_gap"],
        emb[:, base.history_item_index], batch.get("hist_value"), batch.get("hist_count"))
    dense = jnp.concatenate([dense, summary], axis=1)
  return emb, dense


INTERACTIONS = ("none", "dot")


def pairwise_dots(emb: jax.Array) -> jax.Array:
  """FM-style second-order terms: <e_i, e_j> for every pair of feature slots i < j of
  emb [B, F, E] -> [B, F*(F-1)/2], pairs in row-major (i, j) order."""
  i, j = np.triu_indices(emb.shape[1], k=1)
  return jnp.einsum("bpe,bpe->bp", emb[:, i], emb[:, j])


def model_input(schema: FeatureSchema, embed_dim: int, init_std: float,
                batch: dict, interaction: str = "none") -> jax.Array:
  """The flat model input x = concat(flatten(embeddings), dense) -> [B, F*E + D] float32.

  interaction='dot' appends the pairwise dot products of the feature embeddings
  (`pairwise_dots`, e.g. user_id . item_id): a world whose logit is bilinear in user and
  item vectors then needs no MLP to approximate a product.
  """
  if interaction not in INTERACTIONS:
    raise ConfigError(f"model.interaction={interaction!r}: expected one of "
                      f"{', '.join(INTERACTIONS)}")
  emb, dense = embed_batch(schema, embed_dim, init_std, batch)
  parts = [emb.reshape(emb.shape[0], -1), dense]
  if interaction == "dot":
    parts.append(pairwise_dots(emb))
  return jnp.concatenate(parts, axis=1)
