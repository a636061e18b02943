"""pepnet on MovieLens-1M, Scenario-Wise Rec protocol (scenario = user age group)."""
from mscenario.config import base_config
from mscenario.data.presets import scenario_wise_rec


def get_config():
  c = scenario_wise_rec(base_config(), "ml-1m")
  c.model.name = "pepnet"
  return c
