"""m2m on MovieLens-100K, Scenario-Wise Rec protocol (scenario = user age group)."""
from mscenario.config import base_config
from mscenario.data.presets import scenario_wise_rec


def get_config():
  c = scenario_wise_rec(base_config(), "ml-100k")
  c.model.name = "m2m"
  c.model.num_experts = 4
  c.model.expert_hidden = (256,)
  c.model.meta_dim = 32
  c.model.tower_hidden = (64,)
  return c
