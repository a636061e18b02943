"""Which model inputs make up each explained feature ("group").

The trainer's sparse path hands a model its gathered embedding rows as
batch['embedding_rows'] [B, R, E] (R = S sparse + M*L multi-valued + K history slots, the
order of models.embedding.batch_ids); a feature's attribution is the sum over its slots and
embedding dims. Dense columns are one group each; the scenario context (a per-scenario
embedding param, where the model has one) is one more group.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mscenario.models.embedding import data_schema

# Per-scenario embedding params (STAR/SEED context, AdaSparse/M2M/PEPNet/SARNet embedding).
CONTEXT_PARAMS = ("scenario_context", "scenario_embedding")
CONTEXT_GROUP = "scenario_context"
HISTORY_GROUP = "history_items"


@dataclasses.dataclass(frozen=True)
class Groups:
  names: tuple[str, ...]        # every group: row groups, then dense columns, then context
  slot_group: np.ndarray        # [R] group index of each gathered row slot
  slot_feature: np.ndarray      # [R] sparse/multi feature whose table rows the slot reads
  num_row_groups: int
  dense: tuple[str, ...]
  has_context: bool

  @property
  def onehot(self) -> np.ndarray:
    """[R, G_rows] float32: sums slot attributions into their row groups."""
    out = np.zeros((len(self.slot_group), self.num_row_groups), np.float32)
    out[np.arange(len(self.slot_group)), self.slot_group] = 1.0
    return out


def make_groups(schema, has_context: bool) -> Groups:
  """Groups of a model schema (a fusion.TextSchema is explained on its data schema: text
  vectors stay at their actual values, part of the baseline)."""
  base = data_schema(schema)
  names, slot_group, slot_feature = [], [], []
  for i, f in enumerate(base.sparse):
    names.append(f.name)
    slot_group.append(i)
    slot_feature.append(i)
  n_sparse = len(base.sparse)
  for j, f in enumerate(base.multi):
    names.append(f.name)
    slot_group += [n_sparse + j] * f.max_len
    slot_feature += [n_sparse + j] * f.max_len
  if base.history_length:  # gathered whenever the data has histories (used with a sequence)
    names.append(HISTORY_GROUP)
    slot_group += [len(names) - 1] * base.history_length
    slot_feature += [base.history_item_index] * base.history_length
  num_row_groups = len(names)
  names += list(base.dense)
  if has_context:
    names.append(CONTEXT_GROUP)
  return Groups(tuple(names), np.asarray(slot_group, np.int32),
                np.asarray(slot_feature, np.int32), num_row_groups, tuple(base.dense),
                has_context)
