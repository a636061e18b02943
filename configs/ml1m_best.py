"""The best measured configuration on the ML-1M Scenario-Wise Rec protocol (BENCHMARKS.md §1):
MMoE, overall test AUC 0.8128 ± 0.0003 over seeds 2022–2024."""
from mscenario.config import base_config
from mscenario.data.presets import scenario_wise_rec
from mscenario.models.presets import with_model


def get_config():
  return with_model(scenario_wise_rec(base_config(), "ml-1m"), "mmoe")
