"""Shared pytest fixtures."""
from pathlib import Path

import pytest


@pytest.fixture
def shared_data() -> Path:
  """The read-only shared data folder (`../shared/data` from the repo root); skip if absent."""
  path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
  if not path.is_dir():
    pytest.skip(f"shared data not found at {path}")
  return path


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` run only with MSCENARIO_SLOW=1 (CI sets it when time allows)."""
  import os
  if os.environ.get("MSCENARIO_SLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow; set MSCENARIO_SLOW=1 to run")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  """No test writes to the user's data or cache directories."""
  monkeypatch.setenv("MSCENARIO_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
  monkeypatch.setenv("MSCENARIO_DATA", str(tmp_path_factory.getbasetemp() / "data"))
