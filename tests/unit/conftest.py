"""Unit-test fixtures: tmp_path lives in a StrictModes-safe directory (see safe_tmp)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest

from safe_tmp import isolate_from_the_machine, safe_tmp_path

isolate_from_the_machine()  # never the machine's /opt/mitigator_agent/agent.toml


@pytest.fixture
def tmp_path(request: pytest.FixtureRequest) -> Iterator[Path]:
    """Overrides pytest's tmp_path: below ~/.cache, not /tmp (mode 1777 fails StrictModes)."""
    yield from safe_tmp_path(re.sub(r"[^\w-]", "_", request.node.name))
