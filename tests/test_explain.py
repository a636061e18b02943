"""Explanations: integrated-gradients completeness, the baseline, the CLI's outputs, and the
ground truth: on a synthetic world whose per-scenario feature importance is configured, the
attribution ranking of a near-Bayes model recovers it (and shuffled attributions do not)."""
import csv
import json

import numpy as np
import pytest

from mscenario.config import load_config
from mscenario.data.synthetic import IMPORTANCE_FEATURES, SyntheticWorld
from mscenario.errors import MscenarioError
from mscenario.explain import summary
from mscenario.explain.attribute import Explainer
from mscenario.explain.run import explain_workdir, load_run
from mscenario.train.loop import build, load_data, train
from tests.helpers import SYNTHETIC, TINY, tiny

# (user_id, item_id, gender, age_bucket, region, category) per scenario: s0 by user and item
# identity, s1 by age and gender, s2 by category and region; zeros carry nothing.
IMPORTANCE = ((1.0, 1.5, 0.0, 0.0, 0.0, 0.5),
              (0.0, 0.0, 1.0, 1.5, 0.0, 0.5),
              (0.0, 0.0, 0.5, 0.0, 1.0, 1.5))
WORLD = tiny("mmoe") + [
    f"--config.data.synthetic.importance={IMPORTANCE}",
    "--config.data.synthetic.num_rows=50000", "--config.data.synthetic.num_users=300",
    "--config.data.synthetic.num_items=200",
    "--config.train.epochs=6", "--config.train.learning_rate=3e-3",
    "--config.train.patience=0"]
MIN_SPEARMAN = 0.8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("explain") / "run")
  results = train(load_config(SYNTHETIC, WORLD), workdir, log=lambda *a: None)
  return workdir, results, load_run(workdir, log=lambda *a: None)


@pytest.fixture(scope="module")
def attributions(run):
  _, _, r = run
  ex = Explainer(r.setup.model, r.setup.model.schema, r.state, r.data.arrays,
                 r.data.splits["train"])
  return ex, ex.explain(r.data.arrays, r.data.splits["test"][:2000], progress=False)


def _importance_table(a):
  cols = [a.groups.names.index(f) for f in IMPORTANCE_FEATURES]
  return summary.per_scenario_mean_abs(a.attr, a.scenario, len(IMPORTANCE))[:, cols]


def _recovers(table) -> list[float]:
  return [summary.spearman(np.asarray(IMPORTANCE[s]), table[s]) for s in range(len(table))]


def test_model_is_near_bayes(run):
  _, results, _ = run
  for name, m in results["scenarios"].items():
    assert m["auc"] > m["bayes_auc"] - 0.06, (name, m["auc"], m["bayes_auc"])


def test_completeness_within_stated_tolerance(attributions):
  _, a = attributions
  gap = np.abs(a.logit - a.base_logit)
  assert gap.mean() > 0.5  # a real test: the logits move far from the baseline's
  assert a.within_tolerance().all(), np.abs(a.residual).max()
  # ... and the sum is not trivially right: too few path points break it
  assert np.abs(a.residual).max() < 0.05


def test_too_few_steps_break_completeness(run, attributions):
  _, _, r = run
  coarse = Explainer(r.setup.model, r.setup.model.schema, r.state, r.data.arrays,
                     r.data.splits["train"], steps=2)
  a = coarse.explain(r.data.arrays, r.data.splits["test"][:500], progress=False)
  assert not a.within_tolerance().all()


def test_ground_truth_ranking_recovered_and_shuffles_fail(attributions):
  _, a = attributions
  table = _importance_table(a)
  rho = _recovers(table)
  print("spearman per scenario", np.round(rho, 3), "\n", np.round(table, 3))
  assert min(rho) >= MIN_SPEARMAN, rho
  # Random attributions (each scenario's profile shuffled across features) fail the same
  # criterion: the first shuffle, and nearly every one of 500.
  rng = np.random.default_rng(0)
  passed = 0
  for i in range(500):
    shuffled = np.stack([row[rng.permutation(len(row))] for row in table])
    ok = min(_recovers(shuffled)) >= MIN_SPEARMAN
    if i == 0:
      assert not ok
    passed += ok
  assert passed / 500 < 0.02, passed


def test_rows_attributions_track_true_contributions(run, attributions):
  """Per row, the attribution of a scenario's strongest feature correlates with the world's
  own additive term for it (not just the averages)."""
  _, _, r = run
  _, a = attributions
  world = SyntheticWorld(r.config.data.synthetic)
  # Prepared rows are the generator's rows in order (synthetic source, row_line = index + 1).
  truth = world.contributions(world.rows(0, world.num_rows))[a.index]
  for s, f in ((0, "item_id"), (1, "age_bucket"), (2, "category")):
    m = a.scenario == s
    k = IMPORTANCE_FEATURES.index(f)
    c = np.corrcoef(truth[m, k], a.attr[m, a.groups.names.index(f)])[0, 1]
    assert c > 0.7, (s, f, c)


def test_baseline_is_frequency_weighted_mean_embedding(run, attributions):
  _, _, r = run
  ex, _ = attributions
  schema = r.data.schema
  k = [f.name for f in schema.sparse].index("age_bucket")
  ids = np.asarray(r.data.arrays["sparse"][r.data.splits["train"], k])
  table = np.asarray(ex.table)[schema.embedding_offsets[k]:][:schema.sparse[k].vocab_size]
  want = table[ids].astype(np.float64).mean(axis=0)
  np.testing.assert_allclose(ex.baseline.rows[k], want, rtol=1e-5, atol=1e-6)


def test_explain_command_outputs(run, tmp_path):
  workdir, _, _ = run
  out = tmp_path / "out"
  result = explain_workdir(workdir, rows=300, out=str(out), log=lambda *a: None)
  for name in ("explain.json", "attributions.csv", "attribution_heatmap.png",
               "scenario_similarity.png", "gates_gates.png"):
    assert (out / name).stat().st_size > 0, name
  saved = json.loads((out / "explain.json").read_text())
  assert saved["rows"] == 300 and saved["completeness"]["fraction_within"] == 1.0
  assert set(saved["mean_abs_attribution"]) == {"s0", "s1", "s2"}
  gate = np.asarray(saved["gates"]["gates"]["mean_gate"])
  np.testing.assert_allclose(gate.sum(axis=1), 1.0, atol=1e-5)  # softmax over experts
  sim = np.asarray(saved["similarity"]["attribution"])
  np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-9)
  with open(out / "attributions.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 300
  r0 = rows[0]
  total = sum(float(r0[n]) for n in saved["features"])
  assert abs(total - (float(r0["logit"]) - float(r0["baseline_logit"]))) < 0.05
  assert result["features"] == saved["features"]


def test_explain_bad_input_is_a_clear_error(run, tmp_path):
  workdir, _, _ = run
  with pytest.raises(MscenarioError, match="no such file"):
    explain_workdir(workdir, input_path=str(tmp_path / "missing.csv"), log=lambda *a: None)
  with pytest.raises(MscenarioError, match="config.json is missing"):
    explain_workdir(str(tmp_path), log=lambda *a: None)


def test_star_context_and_sparse_table_completeness():
  """STAR's scenario-context param (the forward-mode term) and the sparse-update table path,
  on an untrained model with large random embeddings (no training needed)."""
  config = load_config(SYNTHETIC, TINY + [
      "--config.data.synthetic.num_rows=3000", "--config.model.embed_init_std=0.5",
      "--config.train.embed_update=rowwise_adagrad", "--config.model.batch_norm=false"])
  data = load_data(config, log=lambda *a: None)
  from mscenario.parallel import mesh as mesh_lib
  setup = build(config, data, mesh_lib.make_mesh(config.mesh))
  state = setup.create_state()
  ex = Explainer(setup.model, setup.model.schema, state, data.arrays, data.splits["train"])
  assert ex.groups.names[-1] == "scenario_context" and state.embed
  a = ex.explain(data.arrays, data.splits["test"][:256], progress=False)
  assert np.abs(a.attr[:, -1]).mean() > 1e-3  # the context carries something
  assert a.within_tolerance().all(), np.abs(a.residual).max()
