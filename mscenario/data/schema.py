"""FeatureSchema: the static description of a prepared dataset that models are built from.

Batch contract (numpy on host, jax arrays on device), B = batch size:
  'sparse'   int32   [B, S]     per-feature local ids; 0 = missing, 1 = OOV, known values >= 2
  'multi'    int32   [B, M, L]  multi-valued ids, same id convention; 0 = padding (masked out)
  'dense'    float32 [B, D]     normalised numeric features (+ one 0/1 missing indicator per
                                dense feature that had missing values when fitted)
  'scenario' int32   [B]        scenario index in [0, num_scenarios)
  'label'    float32 [B]        0/1
  'user'     int32   [B]        group id for gAUC (the user's vocabulary id)
  'item'     int32   [B]        item vocabulary id (text tables, cold-start bookkeeping)
  'weight'   float32 [B]        1 for real rows, 0 for padding rows of a final partial eval batch
  'truth'    float32 [B]        (synthetic data only) the true click probability
  'hist_*'   int32   [B, K]     (data.history.length = K > 0) the user's previous K events,
                                most recent first, 0 = padding: hist_item (local ids of the
                                item feature), hist_scenario (+1), hist_feedback (label + 1),
                                hist_gap (log2-hours bucket); see data/history.py
  'hist_value' float32 [B, K]   the raw feedback of those events (e.g. 1-5 stars), 0 = padding
  'hist_count' int32   [B]      how many events the user had before the row (uncapped)
  'hist_item_key' int32 [B, K]  item vocabulary ids of those events (index the text tables)
Arrays with S, M or D equal to 0 are still present (shape [B, 0] etc.) so shapes never branch.
"""
from __future__ import annotations

import dataclasses

PAD_ID = 0   # missing value / multi-valued padding
OOV_ID = 1   # value not in the vocabulary (rarer than min_count, or unseen when fitted)
FIRST_ID = 2
TABLE_ROW_ALIGN = 256


@dataclasses.dataclass(frozen=True)
class SparseFeature:
  name: str
  vocab_size: int  # rows in its embedding table, including PAD and OOV


@dataclasses.dataclass(frozen=True)
class MultiFeature:
  name: str
  vocab_size: int
  max_len: int


@dataclasses.dataclass(frozen=True)
class FeatureSchema:
  sparse: tuple[SparseFeature, ...]
  multi: tuple[MultiFeature, ...]
  dense: tuple[str, ...]          # column names of the 'dense' array, indicators included
  scenario_names: tuple[str, ...]
  user_vocab_size: int = 0
  item_vocab_size: int = 0
  # Behaviour history (data.history.length > 0): K past events per row, whose item ids are
  # local ids of sparse feature `history_item_index` (they share its embedding rows).
  history_length: int = 0
  history_item_index: int = -1
  # The model's sequence encoder, set by the trainer from config.model.sequence:
  # (kind, layers, heads, width); () = no sequence features.
  sequence: tuple = ()

  @property
  def num_scenarios(self) -> int:
    return len(self.scenario_names)

  @property
  def num_dense(self) -> int:
    return len(self.dense)

  @property
  def embedding_offsets(self) -> tuple[int, ...]:
    """Row offset of each sparse then multi feature in the one stacked embedding table."""
    offsets, total = [], 0
    for f in (*self.sparse, *self.multi):
      offsets.append(total)
      total += f.vocab_size
    return tuple(offsets)

  @property
  def total_embedding_rows(self) -> int:
    return sum(f.vocab_size for f in (*self.sparse, *self.multi))

  @property
  def table_rows(self) -> int:
    """Rows of the stacked table, padded to a multiple of TABLE_ROW_ALIGN so that it splits
    evenly over any power-of-two 'model' mesh axis up to that size (a checkpoint's table
    shape therefore does not depend on the mesh it was written on)."""
    total = max(self.total_embedding_rows, 1)
    return -(-total // TABLE_ROW_ALIGN) * TABLE_ROW_ALIGN

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "FeatureSchema":
    return cls(
        sparse=tuple(SparseFeature(**f) for f in d["sparse"]),
        multi=tuple(MultiFeature(**f) for f in d["multi"]),
        dense=tuple(d["dense"]),
        scenario_names=tuple(d["scenario_names"]),
        user_vocab_size=d.get("user_vocab_size", 0),
        item_vocab_size=d.get("item_vocab_size", 0),
        history_length=d.get("history_length", 0),
        history_item_index=d.get("history_item_index", -1),
        sequence=tuple(d.get("sequence", ())),
    )
