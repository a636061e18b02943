"""Cold items of a text-fused model: the training items nearest in the text space.

An item the model never saw (OOV id) is scored from its text vector alone: the text
projection maps it near the training items whose text is alike, and those items' learned
behaviour is what its score borrows. For each explained cold row this lists the K training
items with the highest cosine similarity between its text vector and theirs (rows of the run's
item text table; only items that occur in the training rows), with how often each was clicked
in the row's scenario during training.
"""
from __future__ import annotations

import numpy as np

from mscenario.data.schema import FIRST_ID, OOV_ID

DEFAULT_K = 5
MAX_COLD_ROWS = 200  # explain.json lists at most this many cold rows (the CSV has all)


def cosine_top_k(queries: np.ndarray, table: np.ndarray, candidates: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
  """(candidate ids [N, k], cosine [N, k]) of the `k` rows of `table` (restricted to ids
  `candidates`) most similar to each query vector, best first; zero vectors score 0."""
  def unit(x):
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)
  dim = queries.shape[1]
  cand = np.asarray(candidates, np.int64)
  sims = unit(queries) @ unit(np.asarray(table)[cand, :dim]).T            # [N, C]
  k = min(k, len(cand))
  top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  return cand[top], np.take_along_axis(sims, top, axis=1)


def cold_item_neighbours(arrays: dict, idx: np.ndarray, train_arrays: dict,
                         train_idx: np.ndarray, item_table: np.ndarray, item_vocab: list,
                         scenario_names, k: int = DEFAULT_K) -> list[dict]:
  """One entry per explained row (positions `idx` of `arrays`) whose item is new to the model
  and came with a text vector (arrays['item_text_mask']): its nearest training items."""
  mask = arrays.get("item_text_mask")
  if mask is None:
    return []
  idx = np.asarray(idx, np.int64)
  cold = idx[(np.asarray(arrays["item"])[idx] == OOV_ID) & np.asarray(mask)[idx]]
  if len(cold) == 0:
    return []
  t_items = np.asarray(train_arrays["item"])[train_idx].astype(np.int64)
  t_scen = np.asarray(train_arrays["scenario"])[train_idx].astype(np.int64)
  t_label = np.asarray(train_arrays["label"])[train_idx].astype(np.float64)
  cand = np.unique(t_items[t_items >= FIRST_ID])
  ids, cos = cosine_top_k(np.asarray(arrays["item_text"])[cold], item_table, cand, k)
  rows = np.zeros((len(scenario_names), item_table.shape[0]))
  clicks = np.zeros_like(rows)
  np.add.at(rows, (t_scen, t_items), 1.0)
  np.add.at(clicks, (t_scen, t_items), t_label)
  out = []
  for j, r in enumerate(cold.tolist()):
    s = int(arrays["scenario"][r])
    near = []
    for i, c in zip(ids[j].tolist(), cos[j].tolist()):
      n = rows[s, i]
      near.append({"item": str(item_vocab[i - FIRST_ID]), "cosine": float(c),
                   "train_rows_in_scenario": int(n), "train_rows": int(rows[:, i].sum()),
                   "train_click_rate_in_scenario": float(clicks[s, i] / n) if n else None})
    out.append({"row": r, "scenario": scenario_names[s], "neighbours": near})
  return out
