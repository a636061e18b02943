"""Every shipped config loads, names a registered model and keeps the protocol it claims."""
from __future__ import annotations

import glob
import os

import pytest

from mscenario.config import load_config
from mscenario.models.registry import available_models

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                        "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads(path):
  config = load_config(path, ["--config.seed=7"])
  assert config.seed == 7
  assert config.model.name in available_models()
  if os.path.basename(path).startswith("ml1m_"):
    assert config.data.name == "ml-1m" and config.data.label.rule == "> 3"
    assert tuple(config.data.split.ratios) == (0.8, 0.1, 0.1)
    assert config.model.embed_dim == 16 and config.train.batch_size == 4096


def test_best_config_is_mmoe_with_gated_item_text():
  path = [p for p in CONFIGS if p.endswith("ml1m_best.py")][0]
  config = load_config(path)
  assert config.model.name == "mmoe"
  assert config.text.enabled and config.text.fusion == "gate"
