"""Hypothesis profiles for the fuzz tests, chosen by MITIGATOR_FUZZ_PROFILE, and their fixture.

Imported by each fuzz test module (``from fuzzing import safe_dir``), not
a conftest.py: the integration tests import their conftest by name, and a
third conftest module would shadow it whenever both directories are given
to one pytest run.

- ``quick`` (default, what `make test` and `make unit` run): FUZZ_QUICK_EXAMPLES
  inputs per test, a few thousand in all, in seconds.
- ``fuzz`` (`make fuzz`): FUZZ_EXAMPLES inputs per test, at least 100,000
  per parser, however long that takes.

No deadline in either: a test never times anything.  No example database:
a failure prints the input (and a blob to reproduce it with
``@reproduce_failure``), and nothing is written into the source tree.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from safe_tmp import safe_tmp_path  # noqa: E402  (shared with tests/unit)

FUZZ_QUICK_EXAMPLES = 150
FUZZ_EXAMPLES = 100_000
PROFILE_VARIABLE = "MITIGATOR_FUZZ_PROFILE"

settings.register_profile("quick", max_examples=FUZZ_QUICK_EXAMPLES, deadline=None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=FUZZ_EXAMPLES, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
_profile = os.environ.get(PROFILE_VARIABLE, "quick")
if _profile not in ("quick", "fuzz"):
    raise pytest.UsageError(f"{PROFILE_VARIABLE}={_profile!r}: use quick or fuzz")
settings.load_profile(_profile)


@pytest.fixture(scope="module")
def safe_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """One StrictModes-safe directory per module (hypothesis runs many inputs per test)."""
    yield from safe_tmp_path(re.sub(r"[^\w-]", "_", request.module.__name__))
