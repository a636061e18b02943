"""Model internals in explain.json: PEPNet's EPNet gate per feature x scenario (checked against
the synthetic world's per-scenario feature importance), AdaSparse's learned sparsity, M2M's
scenario-generated weights, and the scenario-similarity matrices from what the model learned."""
import json

import numpy as np
import pytest

from mscenario.config import load_config
from mscenario.explain import report
from mscenario.explain.attribute import Explainer
from mscenario.explain.run import Run, explain_workdir
from mscenario.parallel import mesh as mesh_lib
from mscenario.train.loop import build, load_data, train
from tests.helpers import SYNTHETIC, tiny
from tests.test_explain import IMPORTANCE

# IMPORTANCE (test_explain): user_id and item_id matter in s0 only, age_bucket in s1 only,
# category most in s2 (1.5 vs 0.5).
WHERE_IT_MATTERS = {"user_id": 0, "item_id": 0, "age_bucket": 1, "category": 2}


@pytest.fixture(scope="module")
def pepnet(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pepnet") / "run")
  train(load_config(SYNTHETIC, tiny("pepnet") + [
      f"--config.data.synthetic.importance={IMPORTANCE}",
      "--config.data.synthetic.num_users=300", "--config.data.synthetic.num_items=200",
      "--config.train.epochs=3",
      "--config.train.learning_rate=3e-3", "--config.train.patience=0"]), workdir,
      log=lambda *a: None)
  out = tmp_path_factory.mktemp("pepnet_explain")
  result = explain_workdir(workdir, rows=600, steps=8, out=str(out), log=lambda *a: None)
  return out, result


def test_epnet_gate_is_highest_where_the_feature_matters(pepnet):
  """Each feature whose importance differs across scenarios is gated up most in the scenario
  where it carries the click probability (random gates pass this with chance 1/81)."""
  out, result = pepnet
  gate = result["input_gates"]["ep_gate"]
  feats = gate["features"]
  table = np.asarray(gate["mean_gate"])                              # [S, F]
  print(feats, "\n", np.round(table, 3))
  for f, s in WHERE_IT_MATTERS.items():
    col = table[:, feats.index(f)]
    assert col.argmax() == s, (f, col)
  # The identity features are damped (< neutral 1) where they carry nothing.
  for f in ("user_id", "item_id"):
    assert table[1, feats.index(f)] < gate["neutral"] - 0.1, table[1]
  assert (out / gate["png"]).stat().st_size > 0
  saved = json.loads((out / "explain.json").read_text())
  assert saved["input_gates"]["ep_gate"]["mean_gate"] == gate["mean_gate"]
  for name in ("pp_gate_0", "pp_gate_1"):
    assert len(saved["layer_gates"][name]["mean_gate"]) == 3


def test_learned_similarity_matrices(pepnet):
  _, result = pepnet
  sims = result["similarity"]
  for m in (sims["input_gates"], sims["scenario_embedding"]["scenario_embedding"]):
    m = np.asarray(m)
    assert m.shape == (3, 3)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    assert (np.abs(m[~np.eye(3, dtype=bool)]) < 0.999).all()  # scenarios are told apart


def _untrained(name: str, *overrides):
  """(run, explainer) of an untrained model: shapes and bookkeeping need no training."""
  config = load_config(SYNTHETIC, tiny(name) + ["--config.data.synthetic.num_rows=3000",
                                                *overrides])
  data = load_data(config, log=lambda *a: None)
  setup = build(config, data, mesh_lib.make_mesh(config.mesh))
  run = Run(config, data, setup, setup.create_state())
  return run, Explainer(setup.model, setup.model.schema, run.state, data.arrays,
                        data.splits["train"])


def _internals(run, ex, out) -> dict:
  """The explain.json sections of the captured internals (the report's own code, without
  the attributions)."""
  idx = np.asarray(run.data.splits["test"][:128])
  means, zeros, fixed = report._captured(run, ex, run.data.arrays, idx, 64)
  result = {"similarity": {}}
  names = list(run.setup.model.schema.scenario_names)
  report._gate_sections(run, str(out), names, means, zeros, fixed, result, [])
  return result


def test_adasparse_sparsity_per_scenario(tmp_path):
  """A pruner threshold above every factor (beta = 2) cuts every neuron; threshold 0 none:
  the reported fraction cut follows the model's own pruning, per layer and scenario."""
  cut = _internals(*_untrained("adasparse", "--config.model.adasparse.pruner_epsilon=2.5"),
                   tmp_path)
  kept = _internals(*_untrained("adasparse", "--config.model.adasparse.pruner_epsilon=0.0"),
                    tmp_path)
  for name in ("pruner_1", "pruner_2"):
    assert cut["layer_gates"][name]["fraction_zero"] == [1.0, 1.0, 1.0]
    assert kept["layer_gates"][name]["fraction_zero"] == [0.0, 0.0, 0.0]
  assert np.asarray(cut["input_gates"]["pruner_0"]["mean_gate"]).max() == 0.0
  assert set(kept["input_gates"]["pruner_0"]["features"]) >= {"user_id", "item_id"}
  assert (tmp_path / kept["input_gates"]["pruner_0"]["png"]).stat().st_size > 0


def test_m2m_scenario_parameters_belong_to_their_scenario(tmp_path):
  """M2M generates each scenario's weights from its embedding row: moving scenario 1's row
  changes scenario 1's generated-weight norms only."""
  run, ex = _untrained("m2m")
  before = _internals(run, ex, tmp_path)
  params = run.state.params
  table = np.asarray(params["scenario_embedding"]).copy()
  table[1] += 3.0
  moved = run.state.replace(params={**params, "scenario_embedding": table})
  after = _internals(Run(run.config, run.data, run.setup, moved), ex, tmp_path)
  units = before["scenario_parameters"]["units"]
  assert set(units) == {"meta_attention", "meta_tower_0", "meta_tower_1"}
  for unit in units:
    b = np.asarray(units[unit]["kernel_norm"])
    c = np.asarray(after["scenario_parameters"]["units"][unit]["kernel_norm"])
    assert abs(c[1] - b[1]) > 1e-3 * b[1], unit
    np.testing.assert_allclose(c[[0, 2]], b[[0, 2]], rtol=1e-6)
  sim = np.asarray(after["similarity"]["generated_weights"])
  np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-9)
  assert (tmp_path / "scenario_parameters.png").stat().st_size > 0
