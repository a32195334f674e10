"""The README's kernel matrix table is the run's own output, spliced between markers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernel import matrix

README = Path(__file__).resolve().parents[2] / "README.md"


def test_splice_replaces_only_the_marked_block():
    readme = f"intro\n{matrix.README_BEGIN}\nold table\n{matrix.README_END}\nrest\n"
    table = "<!-- produced by -->\n| kernel |\n|---|\n| 6.1 |\n"
    out = matrix.splice_readme(table, readme)
    assert out == (f"intro\n{matrix.README_BEGIN}\n<!-- produced by -->\n| kernel |\n|---|\n"
                   f"| 6.1 |\n{matrix.README_END}\nrest\n")
    assert matrix.splice_readme(table, out) == out  # idempotent


@pytest.mark.parametrize("readme", [
    "no markers\n",
    f"{matrix.README_END}\nreversed\n{matrix.README_BEGIN}\n",
])
def test_splice_refuses_a_readme_without_its_markers(readme):
    with pytest.raises(ValueError, match="kernel-matrix"):
        matrix.splice_readme("| t |\n", readme)


def test_readme_table_was_written_by_a_run():
    """What sits between the markers starts with the line results() writes, never a hand edit."""
    text = README.read_text()
    block = text[text.index(matrix.README_BEGIN) + len(matrix.README_BEGIN):
                 text.index(matrix.README_END)]
    assert block.lstrip("\n").startswith("<!-- produced by `make matrix` (tests/kernel/matrix.py)")
    # By release, not ABI: a kernel Debian replaced since still has its release's row.
    for suite, _ in matrix.listed():
        assert f" | {suite} | " in block, f"{suite} of tests/kernel/test-kernels is not in the README table"
