"""sarnet on MovieLens-100K, Scenario-Wise Rec protocol (scenario = user age group)."""
from mscenario.config import base_config
from mscenario.data.presets import scenario_wise_rec


def get_config():
  c = scenario_wise_rec(base_config(), "ml-100k")
  c.model.name = "sarnet"
  return c
