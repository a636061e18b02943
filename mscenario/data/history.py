"""Per-row behaviour history: the user's previous K interactions strictly before the row.

Built once in data preparation, vectorised over all rows: sort by (user, time), and for each
row take the K positions before the first event of the same user at the same timestamp — so
neither the row itself, nor anything at the same time or later, is ever in its history.
Most recent first; 0 = padding in every history array.
"""
from __future__ import annotations

import numpy as np

NUM_GAP_BUCKETS = 16  # log2(hours) buckets 1..16; 0 = padding


def gap_bucket(seconds: np.ndarray) -> np.ndarray:
  hours = np.maximum(seconds, 0.0) / 3600.0
  return (1 + np.clip(np.floor(np.log2(hours + 1.0)), 0, NUM_GAP_BUCKETS - 1)).astype(np.int32)


def build_history(users: np.ndarray, times: np.ndarray, items: np.ndarray,
                  scenarios: np.ndarray, labels: np.ndarray, length: int,
                  values: np.ndarray | None = None, keys: np.ndarray | None = None) -> dict:
  """History arrays [N, length] aligned with the input rows.

  items: item ids (>= 1 for real items); scenarios: int scenario index; labels: 0/1;
  values: the raw feedback the label was derived from (e.g. the 1-5 star rating; default:
  the label), richer than the binary label for the user's recent mood.
  Returns 'hist_item' (item id), 'hist_scenario' (scenario + 1), 'hist_feedback'
  (label + 1), 'hist_gap' (time-gap bucket), 'hist_value' (float32 raw feedback); all 0
  where the history is shorter than length; and 'hist_count' [N] (int32), how many events
  the user had strictly before the row (not capped at length). `keys` (e.g. item vocabulary
  ids, which index the text tables) give 'hist_item_key' the same way as 'hist_item'.
  """
  n = len(users)
  order = np.lexsort((np.arange(n), times, users))
  u, t = users[order], times[order]
  pos = np.arange(n)
  new_user = np.r_[True, u[1:] != u[:-1]]
  new_time = new_user | np.r_[True, t[1:] != t[:-1]]
  user_start = np.maximum.accumulate(np.where(new_user, pos, 0))
  time_start = np.maximum.accumulate(np.where(new_time, pos, 0))
  out = {k: np.zeros((n, length), np.int32)
         for k in ("hist_item", "hist_scenario", "hist_feedback", "hist_gap")}
  s_items, s_scen = items[order].astype(np.int32), scenarios[order].astype(np.int32)
  s_lab = labels[order].astype(np.int32)
  s_val = (labels if values is None else values)[order].astype(np.float32)
  out["hist_value"] = np.zeros((n, length), np.float32)
  out["hist_count"] = np.zeros(n, np.int32)
  out["hist_count"][order] = time_start - user_start
  s_keys = None
  if keys is not None:
    s_keys = keys[order].astype(np.int32)
    out["hist_item_key"] = np.zeros((n, length), np.int32)
  for k in range(1, length + 1):
    src = time_start - k
    valid = src >= user_start
    src_c = np.where(valid, src, 0)
    rows = order[valid]
    out["hist_item"][rows, k - 1] = s_items[src_c][valid]
    out["hist_scenario"][rows, k - 1] = s_scen[src_c][valid] + 1
    out["hist_feedback"][rows, k - 1] = s_lab[src_c][valid] + 1
    out["hist_gap"][rows, k - 1] = gap_bucket(t[valid] - t[src_c][valid])
    out["hist_value"][rows, k - 1] = s_val[src_c][valid]
    if s_keys is not None:
      out["hist_item_key"][rows, k - 1] = s_keys[src_c][valid]
  return out
