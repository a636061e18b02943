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


def pytest_configure(config):
  """No test (nor a module-scoped fixture, which runs before function fixtures) writes to the
  user's data or cache directories; subprocesses inherit these too."""
  import os
  import tempfile
  root = tempfile.mkdtemp(prefix="mscenario-tests-")
  os.environ["MSCENARIO_CACHE"] = os.path.join(root, "cache")
  os.environ["MSCENARIO_DATA"] = os.path.join(root, "data")
