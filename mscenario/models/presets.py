"""Per-model layer sizes that differ from the shared `c.model` defaults (which are PLE's and
STAR's), so every data set's config of a model trains the same architecture."""
from __future__ import annotations

from ml_collections import ConfigDict

MODEL_SIZES = {
    # Chosen on the measured quality/speed frontier (BENCHMARKS §15): bottom (256,), towers
    # (32,) train 1.7x faster than (256, 128) / (64,) on ML-1M at 0.8106 ± 0.0006 test AUC
    # (vs 0.8101 ± 0.0008 for the larger sizes, same code, seeds 2022-2024).
    "sharedbottom": {"hidden": (256,), "tower_hidden": (32,)},
    # Experts of 192 (2 shared + 1 per scenario), towers (32,): 0.8125 ± 0.0007 test AUC on
    # ML-1M against 0.8128 ± 0.0003 for experts of 256 / towers (64,), at 2.95 instead of
    # 4.54 GFLOP per 4096-batch and 1.41x the loop's examples/s (BENCHMARKS §15).
    "ple": {"expert_hidden": (192,), "tower_hidden": (32,)},
    "m2m": {"num_experts": 4, "expert_hidden": (256,), "meta_dim": 32, "tower_hidden": (64,)},
    # STAR layer, then the LayerNorm MLP (the reference implementation's sizes).
    "m3oe": {"hidden": (128, 64), "num_experts": 4, "expert_hidden": (64, 32)},
    "sarnet": {"shared_experts": 4, "specific_experts": 2, "expert_hidden": (64,),
               "tower_hidden": (32,)},
}


def with_model(c: ConfigDict, name: str) -> ConfigDict:
  """Select model `name` in config `c`, with its own layer sizes."""
  c.model.name = name
  for key, value in MODEL_SIZES.get(name, {}).items():
    c.model[key] = value
  return c
