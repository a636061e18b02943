"""The synthetic generator: deterministic, chunk-independent, and with known true probabilities."""
import numpy as np
import pytest
from ml_collections import ConfigDict

from mscenario.config import base_config
from mscenario.data import synthetic
from mscenario.data.synthetic import CHUNK_ROWS, SyntheticWorld, load_raw
from mscenario.metrics import auc


def _cfg(**kw):
  c = base_config().data.synthetic
  for k, v in kw.items():
    c[k] = v
  return c


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def world():
  return SyntheticWorld(_cfg())


@pytest.fixture(scope="module")
def big(world):
  return world.rows(0, 300_000)


def test_same_seed_same_rows(world):
  _same(world.rows(0, 10_000), SyntheticWorld(_cfg()).rows(0, 10_000))
  assert list(world.item_texts) == list(SyntheticWorld(_cfg()).item_texts)


def test_different_seed_differs(world):
  a, b = world.rows(0, 10_000), SyntheticWorld(_cfg(seed=1)).rows(0, 10_000)
  assert (a["item_id"] != b["item_id"]).mean() > 0.5
  assert not np.allclose(a["truth"], b["truth"])


def test_row_ranges_are_chunk_independent(world):
  whole = world.rows(0, 3 * CHUNK_ROWS + 17)
  for a, b in [(0, 5), (100, CHUNK_ROWS + 300), (CHUNK_ROWS - 1, 3 * CHUNK_ROWS + 17),
               (2 * CHUNK_ROWS, 2 * CHUNK_ROWS)]:
    _same(world.rows(a, b), {k: v[a:b] for k, v in whole.items()})
  blocks = list(world.stream(chunk_rows=50_000, start=0, stop=whole["label"].size))
  _same({k: np.concatenate([blk[k] for blk in blocks]) for k in whole}, whole)
  with pytest.raises(ValueError):
    world.rows(5, 3)


def test_labels_follow_truth(big):
  assert big["label"].mean() == pytest.approx(big["truth"].mean(), abs=0.005)
  assert np.all((big["truth"] > 0) & (big["truth"] < 1))
  assert set(np.unique(big["label"])) == {0.0, 1.0}
  # Calibration: within deciles of truth, the click rate matches the mean truth.
  edges = np.quantile(big["truth"], np.linspace(0, 1, 11))
  bin_ = np.clip(np.searchsorted(edges, big["truth"], side="right") - 1, 0, 9)
  for b in range(10):
    m = bin_ == b
    assert big["label"][m].mean() == pytest.approx(big["truth"][m].mean(), abs=0.015)


def test_scenarios_differ(world, big):
  sc = big["scenario"]
  share = np.bincount(sc, minlength=world.num_scenarios) / sc.size
  np.testing.assert_allclose(share, world.scenario_share, atol=0.01)
  assert share[0] > 0.5  # one big scenario, the rest small
  rates = [big["label"][sc == s].mean() for s in range(world.num_scenarios)]
  assert max(rates) - min(rates) > 0.1
  assert np.all(np.diff(np.sort(rates)) > 0.03)
  # Item mixes differ too (scenario-specific topic tilt).
  cat = [np.bincount(big["category"][sc == s], minlength=world.num_topics) / (sc == s).sum()
         for s in range(world.num_scenarios)]
  assert np.abs(cat[0] - cat[1]).sum() > 0.1


def test_bayes_auc_high(big):
  bayes = auc(big["label"], big["truth"])
  print(f"Bayes AUC (default synthetic settings, 300k rows): {bayes:.4f}")
  assert 0.75 < bayes < 0.9
  # Side features alone carry signal (user bias depends on them), but less than the truth.
  from mscenario.metrics import gauc
  assert gauc(big["label"], big["truth"], big["user_id"]) > 0.7


def test_popularity_is_skewed(world, big):
  counts = np.sort(np.bincount(big["item_id"], minlength=world.num_items))[::-1]
  top1pct = counts[: world.num_items // 100].sum() / counts.sum()
  assert top1pct > 0.1
  assert (counts > 0).mean() > 0.9  # but the long tail is present


def test_alias_sampling_matches_weights():
  rng = np.random.default_rng(0)
  w = rng.lognormal(0, 1, 50)
  prob, alias = synthetic._alias_table(w)
  draws = synthetic._alias_draw(rng.random(400_000), w.size, prob, alias)
  freq = np.bincount(draws, minlength=w.size) / draws.size
  np.testing.assert_allclose(freq, w / w.sum(), atol=0.004)


def test_load_raw_columns():
  c = base_config()
  c.data.source = "synthetic"
  c.data.synthetic.num_rows = 3000
  t = load_raw(c.data)
  assert t.num_rows == 3000
  t.validate()
  want = {"user_id", "item_id", "scenario", "gender", "age_bucket", "region", "category",
          "item_text", "timestamp", "label", "truth"}
  assert set(t.columns) == want
  col = t.columns
  assert set(col["scenario"]) == {"s0", "s1", "s2"}
  assert set(col["gender"]) <= {"F", "M"}
  assert len(set(col["region"])) > 20
  assert all(isinstance(x, str) for x in col["category"][:50])
  assert all(txt.startswith(f"item {i}: ") for i, txt in zip(col["item_id"][:50],
                                                             col["item_text"][:50]))
  assert len(col["item_text"][0].split()) == 2 + synthetic.WORDS_PER_TEXT
  assert np.all(np.diff(col["timestamp"]) > 0)
  for k in ("timestamp", "label", "truth"):
    assert col[k].dtype == np.float64
  assert t.files[0].startswith("synthetic(seed=0")
  assert t.where(41) == (t.files[0], 42)


def test_category_is_dominant_topic_and_texts_use_its_words(world):
  texts = world.item_texts
  hits = 0
  for i in range(200):
    words = texts[i].split(": ")[1].split()
    hits += any(w in world.topic_words[world.item_category[i]] for w in words)
  assert hits >= 190


def test_more_topics_than_word_lists():
  w = SyntheticWorld(_cfg(num_topics=20, num_items=300, num_users=200, num_scenarios=5,
                          latent_dim=4))
  assert len(w.topic_names) == 20 and w.topic_names[-1] == "topic19"
  r = w.rows(0, 20_000)
  assert r["scenario"].max() == 4
  assert auc(r["label"], r["truth"]) > 0.7
  assert len(w.item_texts) == 300


def test_config_as_plain_mapping_and_validation():
  w = SyntheticWorld(ConfigDict({"num_rows": 10, "num_users": 10, "num_items": 10,
                                 "num_scenarios": 1, "latent_dim": 2, "num_topics": 3,
                                 "seed": 5}))
  assert w.rows(0, 10)["label"].shape == (10,)
  with pytest.raises(ValueError, match="num_items"):
    SyntheticWorld(_cfg(num_items=0))
