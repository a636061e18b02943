"""The base class of every model: shared fields, the input vector, and MLP builders.

Above layers.py (leaf layers) and embedding.py (the embedding collection): a model's inputs
go through `embedding.model_input`, its blocks are layers.py's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax

from mscenario.data.schema import FeatureSchema
from mscenario.models.embedding import model_input
from mscenario.models.layers import MLP, StackedMLP, get_dtype, stacked


class ScenarioModel(nn.Module):
  """Fields every model shares; subclasses implement __call__(batch, train) -> logits [B]."""
  schema: FeatureSchema
  embed_dim: int = 16
  hidden: Sequence[int] = (256, 128)
  dropout: float = 0.0
  activation: str = "relu"
  dtype: str = "float32"
  batch_norm: bool = True
  embed_init_std: float = 1e-4
  interaction: str = "none"   # none | dot: pairwise embedding dot products join `inputs`

  @property
  def num_scenarios(self) -> int:
    return self.schema.num_scenarios

  @property
  def compute_dtype(self):
    return get_dtype(self.dtype)

  def inputs(self, batch: dict) -> jax.Array:
    """x = concat(flatten(embeddings), dense[, pairwise dots]) float32 (call in compact)."""
    return model_input(self.schema, self.embed_dim, self.embed_init_std, batch,
                       self.interaction)

  def mlp(self, hidden: Sequence[int], output_dim: Optional[int] = None,
          name: Optional[str] = None) -> MLP:
    return MLP(tuple(hidden), self.activation, self.dropout, self.dtype, self.batch_norm,
               output_dim, name=name)

  def stacked_mlp(self, n: int, hidden: Sequence[int], output_dim: Optional[int] = None,
                  name: Optional[str] = None) -> nn.Module:
    """`n` independent MLPs with this model's settings; call with x [n, B, in]."""
    return stacked(MLP, n)(tuple(hidden), self.activation, self.dropout, self.dtype,
                           self.batch_norm, output_dim, name=name)

  def parallel_mlps(self, n: int, hidden: Sequence[int], output_dim: Optional[int] = None,
                       name: Optional[str] = None) -> "StackedMLP":
    """Like stacked_mlp (same params), as a StackedMLP: x [B, F] -> [B, n, out] (one input for
    all copies) or x [n, B, F] -> [n, B, out] (one per copy)."""
    return StackedMLP(n, tuple(hidden), self.activation, self.dropout, self.dtype,
                      self.batch_norm, output_dim, name=name)
