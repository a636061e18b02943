"""Text fusion in the models (concat / gate / text_only / scenario context), the frozen
row-sharded 'text' collection, and the cold-item / unseen-scenario splits."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mscenario.config import load_config
from mscenario.models import build_model
from mscenario.models.fusion import (ITEM_SLOT, SCENARIO_SLOT, TextSpec, make_text_schema,
                                     padded_rows)
from tests.helpers import SYNTHETIC, TINY
from tests.test_models import SCHEMA, make_batch, model_cfg

TEXT_DIM = 6
NUM_ITEMS = 40  # item vocabulary ids of SCHEMA's item_id feature, reused as batch['item']


def _tables(seed=0):
  r = np.random.default_rng(seed)
  return {"items": r.normal(size=(NUM_ITEMS, TEXT_DIM)).astype(np.float32),
          "scenarios": r.normal(size=(SCHEMA.num_scenarios, TEXT_DIM)).astype(np.float32)}


def _spec(fusion, scenario_context=False):
  return TextSpec(fusion=fusion, item_dim=TEXT_DIM if fusion != "none" else 0,
                  item_rows=padded_rows(NUM_ITEMS) if fusion != "none" else 0,
                  scenario_context=scenario_context,
                  scenario_dim=TEXT_DIM if scenario_context else 0,
                  scenario_rows=padded_rows(SCHEMA.num_scenarios) if scenario_context else 0,
                  item_slot=1)


def _batch(**kw):
  b = make_batch(**kw)
  b["item"] = b["sparse"][:, 1]
  return b


def _with_tables(variables, spec, tables):
  text = {}
  if spec.fusion != "none":
    items = np.zeros((spec.item_rows, TEXT_DIM), np.float32)
    items[:NUM_ITEMS] = tables["items"]
    text["items"] = jnp.asarray(items)
  if spec.scenario_context:
    sc = np.zeros((spec.scenario_rows, TEXT_DIM), np.float32)
    sc[: SCHEMA.num_scenarios] = tables["scenarios"]
    text["scenarios"] = jnp.asarray(sc)
  return {**variables, "text": {"text_fusion": text}}


def _model(name, fusion, scenario_context=False, **overrides):
  spec = _spec(fusion, scenario_context)
  model = build_model(model_cfg(name, **overrides), make_text_schema(SCHEMA, spec))
  return model, spec


def _init(model, batch):
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch, train=False))


@pytest.mark.parametrize("fusion", ["concat", "gate", "text_only"])
def test_fusion_modes_use_the_text_table(fusion):
  batch = _batch()
  model, spec = _model("sharedbottom", fusion)
  variables = _init(model, batch)
  assert variables["text"]["text_fusion"]["items"].shape == (256, TEXT_DIM)
  assert "item_proj" in variables["params"]["text_fusion"]
  a = model.apply(_with_tables(variables, spec, _tables(0)), batch)
  b = model.apply(_with_tables(variables, spec, _tables(1)), batch)
  assert bool(jnp.isfinite(a).all()) and not np.allclose(a, b)
  # The default (no TextSchema) model has none of it.
  plain = build_model(model_cfg("sharedbottom"), SCHEMA)
  assert "text" not in _init(plain, batch)


@pytest.mark.parametrize("name", ["seed", "sharedbottom", "mmoe", "ple", "star"])
def test_every_model_takes_text_slots(name):
  batch = _batch()
  model, spec = _model(name, "concat", scenario_context=True)
  assert [f.name for f in model.schema.sparse][-2:] == [ITEM_SLOT, SCENARIO_SLOT]
  assert model.schema.table_rows == SCHEMA.table_rows  # virtual slots own no id rows
  variables = _with_tables(_init(model, batch), spec, _tables())
  assert variables["params"]["embedding"]["table"].shape == (SCHEMA.table_rows, 4)
  logits = model.apply(variables, batch)
  assert logits.shape == (32,) and bool(jnp.isfinite(logits).all())
  other = model.apply(_with_tables(variables, spec, _tables(1)), batch)
  assert not np.allclose(logits, other)


def test_text_projection_mlp():
  import dataclasses
  batch = _batch()
  spec = dataclasses.replace(_spec("gate"), proj_hidden=(8, 5))
  model = build_model(model_cfg("star"), make_text_schema(SCHEMA, spec))
  variables = _init(model, batch)
  fusion_params = variables["params"]["text_fusion"]
  assert fusion_params["item_proj_hidden_0"]["kernel"].shape == (TEXT_DIM, 8)
  assert fusion_params["item_proj_hidden_1"]["kernel"].shape == (8, 5)
  assert fusion_params["item_proj"]["kernel"].shape == (5, 4)
  a = model.apply(_with_tables(variables, spec, _tables(0)), batch)
  b = model.apply(_with_tables(variables, spec, _tables(1)), batch)
  assert bool(jnp.isfinite(a).all()) and not np.allclose(a, b)


def test_gate_values_in_unit_interval():
  batch = _batch()
  model, spec = _model("star", "gate")
  variables = _with_tables(_init(model, batch), spec, _tables())
  _, inter = model.apply(variables, batch, mutable=["intermediates"])
  gate = np.asarray(inter["intermediates"]["text_fusion"]["gate_value"][0])
  assert gate.shape == (32,) and ((gate > 0) & (gate < 1)).all()


def test_text_only_ignores_the_item_id():
  batch = _batch()
  model, spec = _model("mmoe", "text_only")
  tables = _tables()
  tables["items"][7] = tables["items"][9]  # two items with the same text
  variables = _with_tables(_init(model, batch), spec, tables)
  a = {**batch, "sparse": batch["sparse"].at[:, 1].set(7), "item": jnp.full(32, 7, jnp.int32)}
  b = {**batch, "sparse": batch["sparse"].at[:, 1].set(9), "item": jnp.full(32, 9, jnp.int32)}
  np.testing.assert_array_equal(model.apply(variables, a), model.apply(variables, b))
  c = {**b, "item": jnp.full(32, 3, jnp.int32)}  # different text: different scores
  assert not np.allclose(model.apply(variables, a), model.apply(variables, c))


def test_unseen_scenario_scored_from_its_description():
  batch = _batch(scenario=np.repeat([0, 1, 2], [11, 11, 10]))
  model, spec = _model("seed", "none", scenario_context=True)
  variables = _init(model, batch)
  tables = _tables()
  a = model.apply(_with_tables(variables, spec, tables), batch)
  tables["scenarios"][2] = np.random.default_rng(5).normal(size=TEXT_DIM)  # new description
  b = model.apply(_with_tables(variables, spec, tables), batch)
  assert bool(jnp.isfinite(b).all())
  np.testing.assert_array_equal(a[:22], b[:22])
  assert not np.allclose(a[22:], b[22:])


# ---------------------------------------------------------------------------- trainer
def _synthetic_config(tmp_path, *overrides):
  return load_config(SYNTHETIC, [*TINY, "--config.data.synthetic.num_rows=4000",
                                 f"--config.data.cache_dir={tmp_path / 'cache'}",
                                 *overrides])


def test_text_collection_frozen_and_row_sharded(tmp_path):
  from mscenario.data.prepare import prepare
  from mscenario.parallel import mesh as mesh_lib
  from mscenario.train import loop
  config = _synthetic_config(tmp_path, "--config.text.enabled=true",
                             "--config.text.fusion=gate", "--config.text.scenario_context=true")
  data = prepare(config, log=lambda *_: None)
  r = np.random.default_rng(0)
  tables = {"items": r.normal(size=(data.schema.item_vocab_size, 8)).astype(np.float32),
            "scenarios": r.normal(size=(data.schema.num_scenarios, 8)).astype(np.float32)}
  setup = loop.build(config, data, mesh_lib.make_mesh(config.mesh), tables)
  shardings = setup.state_shardings.model_state["text"]["text_fusion"]
  assert shardings["items"].spec == P("model", None)
  assert shardings["scenarios"].spec == P("model", None)
  state = setup.create_state()
  items = np.asarray(state.model_state["text"]["text_fusion"]["items"])
  np.testing.assert_array_equal(items[: len(tables["items"])], tables["items"])
  before = jax.tree.map(np.asarray, state.model_state["text"])
  params_before = jax.tree.map(np.asarray, state.params)
  batch = loop.example_batch(data, 512)
  state, metrics = setup.train_step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  after = jax.tree.map(np.asarray, state.model_state["text"])
  jax.tree.map(np.testing.assert_array_equal, before, after)  # bit-identical
  assert "text" not in state.params
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), params_before,
                       jax.tree.map(np.asarray, state.params))
  assert moved["text_fusion"]["item_proj"]["kernel"] and moved["text_fusion"]["gate"]["kernel"]
  assert "batch_stats" in state.model_state


def _prepared(tmp_path, *overrides):
  from mscenario.data.prepare import prepare
  return prepare(_synthetic_config(tmp_path, *overrides), log=lambda *_: None)


def test_cold_items_split_holds_items_out_reproducibly(tmp_path):
  data = _prepared(tmp_path / "a", "--config.data.cold_items=0.1")
  cold = np.asarray(data.meta["cold_items"])
  items = np.asarray(data.arrays["item"])
  n_items = len(np.unique(items))
  assert abs(len(cold) - 0.1 * n_items) <= 1
  for split in ("train", "valid"):
    assert not np.isin(items[data.splits[split]], cold).any()
  test_items = items[data.splits["test"]]
  assert np.isin(cold, test_items).all()  # every row of a cold item went to test
  assert np.isin(items, cold).sum() == np.isin(test_items, cold).sum()
  again = _prepared(tmp_path / "b", "--config.data.cold_items=0.1")
  assert again.meta["cold_items"] == data.meta["cold_items"]
  other = _prepared(tmp_path / "c", "--config.data.cold_items=0.1", "--config.seed=7")
  assert other.meta["cold_items"] != data.meta["cold_items"]
  plain = _prepared(tmp_path / "a")  # the default keeps the old cache key and split
  assert "cold_items" not in plain.meta and plain.fingerprint != data.fingerprint


def test_holdout_scenario_only_in_test(tmp_path):
  data = _prepared(tmp_path, "--config.data.holdout_scenario=s1")
  s1 = list(data.schema.scenario_names).index("s1")
  sc = np.asarray(data.arrays["scenario"])
  for split in ("train", "valid"):
    assert not (sc[data.splits[split]] == s1).any()
  assert (sc[data.splits["test"]] == s1).sum() == (sc == s1).sum() > 0


def test_train_with_text_reports_cold_items(tmp_path):
  """End to end: `train` encodes with a tiny BERT, fuses, reports cold_items; eval agrees."""
  from mscenario import cli
  from tests.test_text import _write_tiny_model
  model_dir = str(tmp_path / "bert")
  _write_tiny_model(model_dir)
  workdir = str(tmp_path / "run")
  args = [*TINY, "--config.data.synthetic.num_rows=6000", "--config.train.epochs=1",
          "--config.text.enabled=true", "--config.text.fusion=gate",
          f"--config.text.model_path={model_dir}", "--config.data.cold_items=0.1"]
  assert cli.main(["train", "--config", SYNTHETIC, "--workdir", workdir, *args]) == 0
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert set(results["cold_items"]) == set(results["overall"])
  assert 0 < results["cold_items"]["n"] < results["overall"]["n"]
  assert os.path.isfile(os.path.join(workdir, "text", "items.npy"))
  assert cli.main(["eval", "--config", SYNTHETIC, "--workdir", workdir, *args]) == 0
  with open(os.path.join(workdir, "eval_test.json")) as f:
    assert json.load(f)["overall"]["auc"] == pytest.approx(results["overall"]["auc"], abs=1e-6)


def test_item_vectors_from_npy_and_parquet(tmp_path):
  """Other modalities: per-item vectors keyed by vocabulary id (.npy) or raw id (Parquet)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  from mscenario.errors import ConfigError
  from mscenario.text.prepare import load_item_vectors
  vocab = ["10", "20", "30"]  # raw ids -> vocabulary ids 2, 3, 4
  vecs = np.arange(10, dtype=np.float32).reshape(5, 2)
  np.save(tmp_path / "v.npy", vecs)
  np.testing.assert_array_equal(load_item_vectors(str(tmp_path / "v.npy"), vocab, 5), vecs)
  with pytest.raises(ConfigError, match="one row per item"):
    load_item_vectors(str(tmp_path / "v.npy"), vocab, 6)
  pq.write_table(pa.table({"item_id": [30, 10, 99], "vec": [[1.0, 2.0], [3.0, 4.0],
                                                            [5.0, 6.0]]}),
                 tmp_path / "v.parquet")
  out = load_item_vectors(str(tmp_path / "v.parquet"), vocab, 5, "item_id")
  np.testing.assert_array_equal(out, [[0, 0], [0, 0], [3, 4], [0, 0], [1, 2]])


def test_item_id_dropout_replaces_only_known_item_ids():
  from mscenario.data.schema import OOV_ID, PAD_ID
  from mscenario.train.steps import drop_item_ids
  r = np.random.default_rng(0)
  sparse = r.integers(2, 50, size=(20000, 3)).astype(np.int32)
  sparse[:100, 1] = PAD_ID
  batch = {"sparse": jnp.asarray(sparse), "item": jnp.asarray(sparse[:, 1])}
  key = jax.random.PRNGKey(3)
  assert drop_item_ids(batch, key, 1, 0.0) is batch
  out = drop_item_ids(batch, key, 1, 0.25)
  got = np.asarray(out["sparse"])
  np.testing.assert_array_equal(got[:, [0, 2]], sparse[:, [0, 2]])  # other slots untouched
  np.testing.assert_array_equal(got[:100, 1], PAD_ID)                # missing stays missing
  dropped = got[100:, 1] == OOV_ID
  assert abs(dropped.mean() - 0.25) < 0.02
  np.testing.assert_array_equal(got[100:, 1][~dropped], sparse[100:, 1][~dropped])
  np.testing.assert_array_equal(np.asarray(out["item"]), sparse[:, 1])  # text rows unchanged
  # Deterministic in the key, different across keys.
  np.testing.assert_array_equal(np.asarray(drop_item_ids(batch, key, 1, 0.25)["sparse"]), got)
  other = np.asarray(drop_item_ids(batch, jax.random.PRNGKey(4), 1, 0.25)["sparse"])
  assert not np.array_equal(other, got)


@pytest.mark.parametrize("embed_update", ["dense", "rowwise_adagrad"])
def test_item_id_dropout_trains_the_oov_row(tmp_path, embed_update):
  """With dropout the OOV row of the item feature gets gradient; without it, it never does."""
  from mscenario.data.prepare import prepare
  from mscenario.data.schema import OOV_ID
  from mscenario.parallel import mesh as mesh_lib
  from mscenario.train import loop
  moved = {}
  for rate in (0.0, 0.3):
    # No weight decay (configs/synthetic.py has 0.1): decoupled decay moves every row.
    config = _synthetic_config(tmp_path, f"--config.train.item_id_dropout={rate}",
                               f"--config.train.embed_update={embed_update}",
                               "--config.train.weight_decay=0.0")
    data = prepare(config, log=lambda *_: None)
    setup = loop.build(config, data, mesh_lib.make_mesh(config.mesh))
    state = setup.create_state()
    slot = [f.name for f in data.schema.sparse].index("item_id")
    row = data.schema.embedding_offsets[slot] + OOV_ID
    before = np.asarray(loop.embedding_table(state))[row]
    state, _ = setup.train_step(state, loop.example_batch(data, 512))
    moved[rate] = not np.array_equal(np.asarray(loop.embedding_table(state))[row], before)
  assert moved == {0.0: False, 0.3: True}


def test_item_id_dropout_rate_is_checked(tmp_path):
  from mscenario.data.prepare import prepare
  from mscenario.errors import ConfigError
  from mscenario.parallel import mesh as mesh_lib
  from mscenario.train import loop
  config = _synthetic_config(tmp_path, "--config.train.item_id_dropout=1.5")
  data = prepare(config, log=lambda *_: None)
  with pytest.raises(ConfigError, match="item_id_dropout"):
    loop.build(config, data, mesh_lib.make_mesh(config.mesh))


def test_predict_scores_brand_new_items_from_their_text(tmp_path):
  """`predict` encodes the text of items the model never saw; without that they would all
  share one zero text row and score alike."""
  import csv

  from mscenario import cli
  from mscenario.data import synthetic
  from tests.test_text import _write_tiny_model
  model_dir = str(tmp_path / "bert")
  _write_tiny_model(model_dir)
  workdir = str(tmp_path / "run")
  args = [*TINY, "--config.data.synthetic.num_rows=4000", "--config.train.epochs=1",
          "--config.text.enabled=true", "--config.text.fusion=gate",
          f"--config.text.model_path={model_dir}"]
  assert cli.main(["train", "--config", SYNTHETIC, "--workdir", workdir, *args]) == 0
  table = synthetic.load_raw(load_config(SYNTHETIC, args).data)
  cols = ["user_id", "item_id", "gender", "region", "category", "age_bucket", "scenario",
          "item_text"]
  base = [table.columns[c][0] for c in cols]
  known_text = str(table.columns["item_text"][0])
  rows = [base,                                               # a known item
          base[:1] + ["new-1"] + base[2:7] + ["space opera with robots"],
          base[:1] + ["new-2"] + base[2:7] + ["a quiet cooking documentary"],
          base[:1] + ["new-3"] + base[2:7] + ["space opera with robots"],
          base[:1] + ["new-4"] + base[2:7] + [known_text]]
  path, out = tmp_path / "rows.csv", tmp_path / "preds.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    w.writerows(rows)
  assert cli.main(["predict", "--workdir", workdir, "--input", str(path), "--output",
                   str(out)]) == 0
  p = [float(r["probability"]) for r in csv.DictReader(open(out))]
  assert p[1] == pytest.approx(p[3], abs=1e-7)   # same text -> same score
  assert abs(p[1] - p[2]) > 1e-6                 # different text -> different score
  assert abs(p[1] - p[4]) > 1e-6


def test_export_of_a_text_model_scores_like_training(tmp_path):
  """A text-fused run exports (tables travel in the weights) and the predictor matches."""
  from mscenario import cli
  from mscenario.parallel import mesh as mesh_lib
  from mscenario.export import writer as export
  from mscenario.serve import predictor as pred_lib
  from mscenario.train import evaluate, loop
  from tests.test_text import _write_tiny_model
  model_dir = str(tmp_path / "bert")
  _write_tiny_model(model_dir)
  workdir, out = str(tmp_path / "run"), str(tmp_path / "exported")
  args = [*TINY, "--config.data.synthetic.num_rows=4000", "--config.train.epochs=1",
          "--config.text.enabled=true", "--config.text.fusion=gate",
          "--config.text.scenario_context=true", f"--config.text.model_path={model_dir}"]
  assert cli.main(["train", "--config", SYNTHETIC, "--workdir", workdir, *args]) == 0
  assert cli.main(["export", "--workdir", workdir, "--out", out, "--buckets", "8,64"]) == 0
  config, _, _, state, _ = export.restore(workdir)
  data = loop.load_data(config, log=lambda *_: None)
  setup = loop.build(config, data, mesh_lib.make_mesh(config.mesh, jax.devices()[:1]),
                     evaluate._text_tables(config, workdir, data))
  want = loop.predict(setup, state, "test")
  idx = data.splits["test"]
  model = pred_lib.load(out)
  assert model.manifest["item_text"]["template"]
  got = model.score_arrays({k: np.asarray(v[idx]) for k, v in data.arrays.items()})
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  # Requests: items the model never saw are scored from their text, like `predict` does.
  from mscenario.data import synthetic
  table = synthetic.load_raw(config.data)
  row = {k: table.columns[k][0] for k in ("user_id", "gender", "region", "category",
                                          "age_bucket", "item_text")}
  row = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}

  def score(item_id, text):
    item = dict(row, item_id=item_id, item_text=text)
    return float(model.predict({"scenario": str(table.columns["scenario"][0]), "user": {},
                                "items": [item]})[0])
  a, b = score("new-1", "space opera with robots"), score("new-2", "a quiet cooking film")
  assert score("new-3", "space opera with robots") == pytest.approx(a, abs=1e-7)
  assert abs(a - b) > 1e-6
  known = score(str(row["item_id"]) if "item_id" in row else str(table.columns["item_id"][0]),
                "anything at all")
  assert known == pytest.approx(score(str(table.columns["item_id"][0]), "other words"),
                                abs=1e-7)  # known items keep their trained text row


def test_scenario_route_hand_case():
  from mscenario.models.fusion import scenario_route
  d = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 1.0]])
  assert scenario_route(d, [1, 1, 0, 0]) == (0, 1, 0, 1)
  assert scenario_route(d, [1, 1, 1, 1]) == ()   # nothing unseen
  assert scenario_route(d, [0, 0, 0, 0]) == ()   # nothing to route to


def test_unseen_scenario_is_scored_as_its_nearest_trained_one(tmp_path):
  """Holdout scenario s1 has no training rows: with text it is routed by description to a
  trained scenario, and its rows score exactly like the same rows in that scenario."""
  from mscenario.data.prepare import prepare
  from mscenario.data.synthetic import SyntheticWorld
  from mscenario.parallel import mesh as mesh_lib
  from mscenario.train import loop
  config = _synthetic_config(tmp_path, "--config.text.enabled=true",
                             "--config.text.fusion=none", "--config.text.scenario_context=true",
                             "--config.data.holdout_scenario=s1")
  data = prepare(config, log=lambda *_: None)
  names = list(data.schema.scenario_names)
  s1 = names.index("s1")
  descriptions = SyntheticWorld(config.data.synthetic).scenario_descriptions()
  r = np.random.default_rng(0)
  scen = r.normal(size=(len(names), 8)).astype(np.float32)
  target = (s1 + 1) % len(names)
  scen[s1] = scen[target] + 0.01  # s1's description is nearest to `target`'s
  seen = np.ones(len(names), np.float32)
  seen[s1] = 0
  tables = {"scenarios": scen, "scenario_seen": seen}
  assert descriptions  # the synthetic world has descriptions for its scenarios
  setup = loop.build(config, data, mesh_lib.make_mesh(config.mesh), tables)
  route = setup.model.schema.text.scenario_route
  assert route[s1] == target and all(route[i] == i for i in range(len(names)) if i != s1)
  state = setup.create_state()
  batch = loop.example_batch(data, 256)
  batch["scenario"] = np.full_like(batch["scenario"], s1)
  moved = dict(batch, scenario=np.full_like(batch["scenario"], target))
  sharding = mesh_lib.batch_sharding(setup.mesh)
  from mscenario.data import pipeline
  probs = [np.asarray(setup.eval_step(state.params, state.model_state, state.embed,
                                      pipeline.to_global(b, sharding))) for b in (batch, moved)]
  np.testing.assert_array_equal(probs[0], probs[1])
  # unseen_scenario=none switches routing off.
  with config.unlocked():
    config.text.unseen_scenario = "none"
  plain = loop.build(config, data, mesh_lib.make_mesh(config.mesh), tables)
  assert plain.model.schema.text.scenario_route == ()


def test_history_affinity_matches_numpy():
  from mscenario.models.fusion import history_affinity
  r = np.random.default_rng(0)
  b, k, e = 16, 7, 5
  cand, hist = r.normal(size=(b, e)), r.normal(size=(b, k, e))
  filled = r.integers(0, k + 1, b)
  mask = np.arange(k)[None] < filled[:, None]
  labels, values = r.integers(0, 2, (b, k)), r.integers(1, 6, (b, k)).astype(np.float64)
  feedback = np.where(mask, labels + 1, 0)
  got = np.asarray(history_affinity(jnp.asarray(cand), jnp.asarray(hist), jnp.asarray(feedback),
                                    jnp.asarray(np.where(mask, values, 0)), 3.0))
  for i in range(b):
    m = mask[i]
    if not m.any():
      np.testing.assert_allclose(got[i], [0, 0, -1, 0], atol=1e-6)
      continue
    c = cand[i] / np.linalg.norm(cand[i])
    h = hist[i][m] / np.linalg.norm(hist[i][m], axis=1, keepdims=True)
    sim = h @ c
    w = np.exp(3 * sim) / np.exp(3 * sim).sum()
    want = [(w * labels[i][m]).sum(), (w * values[i][m]).sum(), sim.max(), sim.mean()]
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


def test_history_affinity_reaches_the_model(tmp_path):
  """Text + history (no sequence encoder): the labels the user gave past items change the
  score through the content affinity; without history the dense input has no extra columns."""
  from mscenario.data import pipeline
  from mscenario.data.prepare import prepare
  from mscenario.parallel import mesh as mesh_lib
  from mscenario.train import loop
  config = _synthetic_config(tmp_path, "--config.text.enabled=true", "--config.text.fusion=gate",
                             "--config.data.history.length=5", "--config.model.name=star")
  data = prepare(config, log=lambda *_: None)
  keys = np.asarray(data.arrays["hist_item_key"])
  items = np.asarray(data.arrays["item"])
  # hist_item_key holds the item vocabulary ids of earlier events (the text-table rows).
  assert ((keys > 0) == (np.asarray(data.arrays["hist_item"]) > 0)).all()
  assert np.isin(keys[keys > 0], items).all()
  r = np.random.default_rng(0)
  tables = {"items": r.normal(size=(data.schema.item_vocab_size, 8)).astype(np.float32),
            "scenarios": r.normal(size=(data.schema.num_scenarios, 8)).astype(np.float32)}
  setup = loop.build(config, data, mesh_lib.make_mesh(config.mesh), tables)
  assert setup.model.schema.text.history_affinity
  state = setup.create_state()
  batch = loop.example_batch(data, 256)
  sharding = mesh_lib.batch_sharding(setup.mesh)

  def probs(b):
    return np.asarray(setup.eval_step(state.params, state.model_state, state.embed,
                                      pipeline.to_global(b, sharding)))
  flipped = dict(batch, hist_feedback=np.where(batch["hist_feedback"] > 0,
                                               3 - batch["hist_feedback"], 0).astype(np.int32))
  assert np.abs(probs(flipped) - probs(batch)).max() > 1e-6
  # A batch of 16 (16 x 5 history keys < table rows) projects gathered rows instead of the
  # whole table: same numbers.
  assert setup.model.schema.text.item_rows > 16 * 5
  small = {k: v[:16] for k, v in batch.items()}
  np.testing.assert_allclose(probs(small), probs(batch)[:16], atol=1e-6)


def test_history_affinity_gradient_is_finite_at_zero_vectors():
  from mscenario.models.fusion import history_affinity
  cand = jnp.zeros((2, 3))
  hist = jnp.zeros((2, 4, 3))
  feedback = jnp.array([[2, 1, 0, 0], [0, 0, 0, 0]])
  value = jnp.array([[5.0, 1.0, 0, 0], [0, 0, 0, 0]])
  grads = jax.grad(lambda c, h: history_affinity(c, h, feedback, value, 5.0).sum(),
                   argnums=(0, 1))(cand, hist)
  assert all(bool(jnp.isfinite(g).all()) for g in grads)
