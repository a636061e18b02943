"""m3oe on MovieLens-1M, Scenario-Wise Rec protocol (scenario = user age group)."""
from mscenario.config import base_config
from mscenario.data.presets import scenario_wise_rec


def get_config():
  c = scenario_wise_rec(base_config(), "ml-1m")
  c.model.name = "m3oe"
  c.model.hidden = (128, 64)         # STAR layer, then the LayerNorm MLP (the reference's)
  c.model.num_experts = 4
  c.model.expert_hidden = (64, 32)
  return c
