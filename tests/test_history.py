"""Behaviour histories never contain the row's own event, a simultaneous one, or a later one."""
from __future__ import annotations

import numpy as np

from mscenario.data.history import build_history, gap_bucket


def _brute(users, times, items, length):
  out = np.zeros((len(users), length), np.int32)
  for i in range(len(users)):
    prev = [j for j in range(len(users)) if users[j] == users[i] and times[j] < times[i]]
    prev.sort(key=lambda j: (times[j], j), reverse=True)
    for k, j in enumerate(prev[:length]):
      out[i, k] = items[j]
  return out


def test_history_matches_brute_force_and_never_leaks():
  rng = np.random.default_rng(0)
  n = 600
  users = rng.integers(0, 20, n)
  times = rng.integers(0, 50, n).astype(np.float64)  # many ties on purpose
  items = rng.integers(2, 1000, n)
  scen = rng.integers(0, 3, n)
  labels = rng.integers(0, 2, n)
  h = build_history(users, times, items, scen, labels, 5)
  ref = _brute(users, times, items, 5)
  # Same multiset per row: among equal timestamps the order is by row index in both.
  np.testing.assert_array_equal(h["hist_item"], ref)
  item_time = {}
  for i in range(n):
    for k in range(5):
      if h["hist_item"][i, k]:
        # Every history entry is an earlier event of the same user.
        cands = [j for j in range(n) if users[j] == users[i] and items[j] == h["hist_item"][i, k]
                 and times[j] < times[i]]
        assert cands, (i, k)
  assert (h["hist_feedback"][h["hist_item"] > 0] >= 1).all()
  assert ((h["hist_item"] == 0) == (h["hist_gap"] == 0)).all()


def test_first_event_has_empty_history_and_feedback_is_label():
  users = np.array([1, 1, 1, 2])
  times = np.array([10.0, 20.0, 20.0, 5.0])
  items = np.array([5, 6, 7, 8])
  labels = np.array([1, 0, 1, 1])
  h = build_history(users, times, items, np.array([0, 1, 2, 0]), labels, 3)
  assert h["hist_item"][0].tolist() == [0, 0, 0]
  # The two events at t=20 see only the t=10 event, not each other.
  assert h["hist_item"][1].tolist() == [5, 0, 0]
  assert h["hist_item"][2].tolist() == [5, 0, 0]
  assert h["hist_feedback"][1, 0] == 2 and h["hist_scenario"][1, 0] == 1
  assert h["hist_item"][3].tolist() == [0, 0, 0]


def test_gap_buckets():
  assert gap_bucket(np.array([0.0]))[0] == 1
  assert gap_bucket(np.array([3600.0 * 3]))[0] == 3
  assert gap_bucket(np.array([1e12]))[0] == 16
