"""Every input reader and the override parser under property-based fuzzing (issue 10 §2):
any generated file or string loads with the documented semantics (checked value by value
against the reference reader in tests/fuzz_readers.py) or raises the project's user error
naming file, line and field -- never another exception type.

This is the short run (profile 'ci', 300 cases per reader, ~25 s); benchmarks/fuzz_inputs.py runs
the same properties for >= 10,000 cases per reader.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests import fuzz_readers

settings.register_profile("ci", max_examples=300, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.mark.parametrize("reader", sorted(fuzz_readers.READERS))
def test_reader_never_escapes_with_a_traceback(reader):
  strategy, check = fuzz_readers.READERS[reader]

  @settings(settings.get_profile("ci"))
  @given(strategy)
  def run(case):
    assert check(case) in ("loaded", "skipped", "user-error")
  run()
