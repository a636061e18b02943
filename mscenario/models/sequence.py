"""Scenario-aware behaviour-sequence encoder with target attention (BST / DIN style).

Each history token is the item's embedding (from the shared stacked table, so history and
candidate items share rows) plus learned embeddings of the scenario it happened in, the
feedback it got (click / no click), its time gap to now and its position. A Transformer
encoder (or an LSTM, for comparison) contextualises the tokens; the candidate item then
attends over them (target attention), so the summary depends on what is being scored. Sizes
run from tiny to large (layers, heads, width): this is the component that scales on
accelerators.

Next to the learned summary, `stats` adds cheap hand-made statistics of the same history —
mean label and mean raw feedback (e.g. stars) over the last 1/5/20/K events, how full those
windows are, and log(1 + number of earlier events). On MovieLens-1M a user's last ~20 ratings
predict the next one better than their all-time mean (single-feature AUC 0.713 vs 0.693):
tastes and moods come in sessions.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mscenario.data.history import NUM_GAP_BUCKETS
from mscenario.models.layers import get_dtype


class TransformerBlock(nn.Module):
  width: int
  heads: int
  dropout: float
  dtype: str

  @nn.compact
  def __call__(self, x, mask, train):
    dt = get_dtype(self.dtype)
    attn_mask = nn.make_attention_mask(mask, mask)
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=dt,
                                        param_dtype=jnp.float32, dropout_rate=self.dropout,
                                        deterministic=not train)(x, x, mask=attn_mask)
    x = nn.LayerNorm(dtype=dt, param_dtype=jnp.float32)(x + h)  # post-LN, as BERT/BST
    h = nn.Dense(4 * self.width, dtype=dt, param_dtype=jnp.float32)(x)
    h = nn.Dense(self.width, dtype=dt, param_dtype=jnp.float32)(nn.gelu(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.LayerNorm(dtype=dt, param_dtype=jnp.float32)(x + h)


STAT_WINDOWS = (1, 5, 20)


def history_stats(feedback, value, count):
  """[B, 3 * windows + 1] statistics of the history (most recent first, 0 = padding).

  For each window w in STAT_WINDOWS (<= K) and K itself: mean label, mean raw value and the
  filled fraction; then log1p(count). Empty windows give 0 with fill 0, so the model knows.
  """
  k = feedback.shape[1]
  mask = (feedback > 0).astype(jnp.float32)
  label = jnp.maximum(feedback - 1, 0).astype(jnp.float32)
  value = value.astype(jnp.float32) * mask
  cols = []
  for w in sorted({w for w in STAT_WINDOWS if w < k} | {k}):
    m = mask[:, :w].sum(axis=1)
    denom = jnp.maximum(m, 1.0)
    cols += [(label[:, :w] * mask[:, :w]).sum(axis=1) / denom,
             value[:, :w].sum(axis=1) / denom, m / w]
  cols.append(jnp.log1p(count.astype(jnp.float32)))
  return jnp.stack(cols, axis=1)


class SequenceEncoder(nn.Module):
  """History tokens [B, K] + candidate item embedding -> summary [B, 2 * width (+ stats)]."""
  num_scenarios: int
  width: int = 32
  layers: int = 1
  heads: int = 2
  kind: str = "transformer"   # transformer | lstm | mean | stats (statistics only)
  stats: bool = True          # append history_stats() to the learned summary
  dropout: float = 0.0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, item_emb, scenario, feedback, gap, candidate, value=None, count=None,
               train=False):
    """item_emb [B, K, E] (zeros at padding), scenario/feedback/gap [B, K] int (0 = padding),
    candidate [B, E]; value [B, K] raw feedback (default: the label), count [B] earlier
    events (default: the filled history length)."""
    dt = get_dtype(self.dtype)
    k = item_emb.shape[1]
    mask = feedback > 0
    if value is None:
      value = jnp.maximum(feedback - 1, 0).astype(jnp.float32)
    if count is None:
      count = mask.sum(axis=1)
    stats = history_stats(feedback, value, count)
    if self.kind == "stats":
      return stats
    value_tok = nn.Dense(self.width, dtype=dt, param_dtype=jnp.float32, name="value_proj")(
        (value * mask)[..., None].astype(jnp.float32))
    tok = nn.Dense(self.width, dtype=dt, param_dtype=jnp.float32, name="item_proj")(item_emb)
    tok = tok + nn.Embed(self.num_scenarios + 1, self.width, name="scenario_emb")(scenario)
    tok = tok + nn.Embed(3, self.width, name="feedback_emb")(feedback)
    tok = tok + nn.Embed(NUM_GAP_BUCKETS + 1, self.width, name="gap_emb")(gap)
    tok = tok + value_tok
    tok = tok + self.param("position", nn.initializers.normal(0.02), (k, self.width))
    tok = tok * mask[..., None]
    if self.kind == "transformer":
      h = tok
      for i in range(self.layers):
        h = TransformerBlock(self.width, self.heads, self.dropout, self.dtype,
                             name=f"block_{i}")(h, mask, train)
    elif self.kind == "lstm":
      # Histories are most-recent-first; the LSTM reads them oldest-first.
      lengths = mask.sum(axis=1)
      rev = jnp.flip(tok, axis=1)
      rolled = jax.vmap(lambda t, n: jnp.roll(t, n - k, axis=0))(rev, lengths)
      h = nn.RNN(nn.OptimizedLSTMCell(self.width), name="lstm")(rolled, seq_lengths=lengths)
      h = jax.vmap(lambda t, n: jnp.roll(t, k - n, axis=0))(h, lengths)
      h = jnp.flip(h, axis=1)
    elif self.kind == "mean":
      h = tok
    else:
      raise ValueError(f"sequence kind {self.kind!r}: expected transformer, lstm, mean or "
                       "stats")
    h = h * mask[..., None]
    # Target attention: the candidate item asks which past events matter for it.
    query = nn.Dense(self.width, dtype=dt, param_dtype=jnp.float32, name="query")(candidate)
    scores = jnp.einsum("bd,bkd->bk", query, h).astype(jnp.float32) / jnp.sqrt(self.width)
    scores = jnp.where(mask, scores, -1e9)
    weights = jax.nn.softmax(scores, axis=-1) * mask.any(axis=1, keepdims=True)
    attended = jnp.einsum("bk,bkd->bd", weights.astype(h.dtype), h)
    mean = h.sum(axis=1) / jnp.maximum(mask.sum(axis=1, keepdims=True), 1)
    parts = [attended, mean] + ([stats] if self.stats else [])
    return jnp.concatenate(parts, axis=-1).astype(jnp.float32)
