"""pepnet on MovieLens-1M, Scenario-Wise Rec protocol (scenario = user age group)."""
from mscenario.config import base_config
from mscenario.data.presets import scenario_wise_rec
from mscenario.models.presets import with_model


def get_config():
  return with_model(scenario_wise_rec(base_config(), "ml-1m"), "pepnet")
