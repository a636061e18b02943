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
  for i in range(n):
    for k in range(5):
      if h["hist_item"][i, k]:
        # Every history entry is an earlier event of the same user.
        cands = [j for j in range(n) if users[j] == users[i] and items[j] == h["hist_item"][i, k]
                 and times[j] < times[i]]
        assert cands, (i, k)
  assert (h["hist_feedback"][h["hist_item"] > 0] >= 1).all()
  assert ((h["hist_item"] == 0) == (h["hist_gap"] == 0)).all()


def test_history_values_and_counts_match_brute_force():
  rng = np.random.default_rng(1)
  n = 500
  users = rng.integers(0, 15, n)
  times = rng.integers(0, 40, n).astype(np.float64)
  stars = rng.integers(1, 6, n).astype(np.float64)
  items = np.arange(n) + 2  # unique, so an item id names its source row
  h = build_history(users, times, items, rng.integers(0, 3, n), (stars > 3).astype(int), 4,
                    values=stars)
  for i in range(n):
    earlier = [j for j in range(n) if users[j] == users[i] and times[j] < times[i]]
    assert h["hist_count"][i] == len(earlier)  # uncapped, strictly earlier only
    for k in range(4):
      src = h["hist_item"][i, k] - 2
      if src < 0:
        assert h["hist_value"][i, k] == 0
        continue
      assert src in earlier
      assert h["hist_value"][i, k] == stars[src]
      assert h["hist_feedback"][i, k] == (stars[src] > 3) + 1


def test_history_stats_match_numpy():
  from mscenario.models.sequence import history_stats
  rng = np.random.default_rng(2)
  b, k = 64, 30
  filled = rng.integers(0, k + 1, b)
  mask = np.arange(k)[None, :] < filled[:, None]  # most recent first, padding at the end
  labels = rng.integers(0, 2, (b, k))
  values = rng.integers(1, 6, (b, k)).astype(np.float32)
  feedback = np.where(mask, labels + 1, 0)
  count = filled + rng.integers(0, 100, b) * (filled == k)
  got = np.asarray(history_stats(feedback, np.where(mask, values, 0), count))
  cols = []
  for w in (1, 5, 20, 30):
    m = mask[:, :w]
    n = np.maximum(m.sum(1), 1)
    cols += [(labels[:, :w] * m).sum(1) / n, (values[:, :w] * m).sum(1) / n, m.sum(1) / w]
  cols.append(np.log1p(count))
  np.testing.assert_allclose(got, np.stack(cols, 1), rtol=1e-6, atol=1e-6)


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


# ---------------------------------------------------------------- prepared data + models
import pytest  # noqa: E402

from mscenario.config import load_config  # noqa: E402
from mscenario.data import pipeline  # noqa: E402
from mscenario.data.prepare import prepare  # noqa: E402
from mscenario.parallel import mesh as mesh_lib  # noqa: E402
from mscenario.train import loop  # noqa: E402
from tests.helpers import SYNTHETIC, TINY, tiny  # noqa: E402


def _config(*extra, model="star"):
  return load_config(SYNTHETIC, [*tiny(model), "--config.data.history.length=6", *extra])


def test_prepared_history_is_strictly_earlier_events_of_the_same_user():
  from mscenario.data import synthetic
  config = _config()
  data = prepare(config, log=lambda *_: None)
  assert data.schema.history_length == 6
  table = synthetic.load_raw(config.data)  # no rows are skipped: row i is prepared row i
  users = np.asarray(data.arrays["user"])
  times = np.asarray(table.columns["timestamp"])
  item_ids = np.asarray(data.arrays["sparse"])[:, data.schema.history_item_index]
  hist = np.asarray(data.arrays["hist_item"])
  rng = np.random.default_rng(0)
  for i in rng.choice(len(users), 300, replace=False):
    earlier = np.flatnonzero((users == users[i]) & (times < times[i]))
    expect = earlier[np.lexsort((earlier, times[earlier]))][::-1][:6]
    got = hist[i][hist[i] > 0]
    np.testing.assert_array_equal(got, item_ids[expect])


@pytest.mark.parametrize("kind,name", [("transformer", "star"), ("lstm", "star"),
                                       ("stats", "star"), ("transformer", "seed"),
                                       ("stats", "mmoe")])
def test_sequence_features_reach_the_model_and_ignore_padding(kind, name):
  config = _config(f"--config.model.sequence.kind={kind}", model=name)
  data = prepare(config, log=lambda *_: None)
  setup = loop.build(config, data, mesh_lib.make_mesh(config.mesh))
  state = setup.create_state()
  it = pipeline.BatchIterator(data, "valid", 256, seed=0, shuffle=False, drop_last=True)
  batch = next(it.epoch(0))
  assert (batch["hist_item"] > 0).any() and (batch["hist_item"] == 0).any()
  sharding = mesh_lib.batch_sharding(setup.mesh)

  def probs(b):
    return np.asarray(setup.eval_step(state.params, state.model_state, state.embed,
                                      pipeline.to_global(b, sharding)))

  base = probs(batch)
  # Values at padded history positions are ignored.
  padded = dict(batch)
  pad = batch["hist_item"] == 0
  padded["hist_scenario"] = np.where(pad, 2, batch["hist_scenario"]).astype(np.int32)
  padded["hist_gap"] = np.where(pad, 5, batch["hist_gap"]).astype(np.int32)
  np.testing.assert_allclose(probs(padded), base, atol=1e-6)
  # Real history entries matter: flipping the feedback of past events changes predictions.
  flipped = dict(batch)
  flipped["hist_feedback"] = np.where(pad, 0, 3 - batch["hist_feedback"]).astype(np.int32)
  assert np.abs(probs(flipped) - base).max() > 1e-6
  # So do the raw feedback values and the count of earlier events.
  for key in ("hist_value", "hist_count"):
    changed = dict(batch)
    changed[key] = (batch[key] * 2 + 1).astype(batch[key].dtype)
    if key == "hist_value":
      changed[key] = np.where(pad, 0, changed[key]).astype(np.float32)
    assert np.abs(probs(changed) - base).max() > 1e-6, key


def test_sequence_without_history_is_a_clear_error():
  from mscenario.errors import ConfigError
  config = load_config(SYNTHETIC, [*TINY, "--config.model.sequence.kind=transformer"])
  data = prepare(config, log=lambda *_: None)
  with pytest.raises(ConfigError, match="history.length"):
    loop.build(config, data, mesh_lib.make_mesh(config.mesh))


def test_export_of_a_history_model_is_a_clear_error(tmp_path):
  from mscenario import cli
  workdir = str(tmp_path / "run")
  args = [*TINY, "--config.data.history.length=4", "--config.model.sequence.kind=stats",
          "--config.train.epochs=1"]
  assert cli.main(["train", "--config", SYNTHETIC, "--workdir", workdir, *args]) == 0
  with pytest.raises(Exception, match="behaviour histories"):
    from mscenario.export import writer as export
    export.export(workdir, str(tmp_path / "out"))
  # Scoring raw rows says why not (the history comes from the run's event log), for predict
  # and for explain --input alike, instead of failing inside the checkpoint restore.
  import mscenario as ms
  from mscenario.errors import MscenarioError
  rows = tmp_path / "rows.csv"
  rows.write_text("user_id,item_id,scenario\n1,2,feed\n")
  run = ms.Run.open(workdir)
  with pytest.raises(MscenarioError, match="behaviour histories"):
    run.predict(str(rows))
  with pytest.raises(MscenarioError, match="behaviour histories"):
    run.explain(input=str(rows))
