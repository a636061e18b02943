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
