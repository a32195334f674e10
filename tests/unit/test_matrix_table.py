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


def test_refresh_moves_only_the_pins_and_the_date():
    text = ("# header, kept\n# refreshed: 2026-01-01\n"
            "bullseye 5.10.0-32-amd64        # 5.10.223-1\n"
            "bookworm 6.1.0-57-amd64         # 6.1.192-3\n")
    current = {"bullseye": ("5.10.0-46-amd64", "5.10.262-1"), "bookworm": ("6.1.0-57-amd64", "6.1.192-3")}
    new, moved = matrix.rewrite_pins(text, current, "2026-12-06")
    assert new == ("# header, kept\n# refreshed: 2026-12-06\n"
                   "bullseye 5.10.0-46-amd64        # 5.10.262-1\n"
                   "bookworm 6.1.0-57-amd64         # 6.1.192-3\n")
    assert moved == ["bullseye: 5.10.0-32-amd64 -> 5.10.0-46-amd64 (5.10.262-1)"]
    assert matrix.rewrite_pins(new, current, "2026-12-06") == (new, [])


def test_the_pins_file_is_in_the_refreshed_form():
    """test-kernels as `make matrix-refresh` writes it: a date, and each pin with its Debian version."""
    text = matrix.LIST.read_text()
    assert any(line.startswith("# refreshed: 20") for line in text.splitlines())
    for line in text.splitlines():
        if line.split("#", 1)[0].split():
            assert len(line.split("#", 1)[0].split()) == 2 and line.split("#", 1)[1].strip(), line
    # The pins as the tool writes them: rewriting them with their own values changes nothing but the date.
    date = next(line for line in text.splitlines() if line.startswith("# refreshed: ")).split(": ", 1)[1]
    own = {line.split()[0]: (line.split()[1], line.split("#", 1)[1].strip())
           for line in text.splitlines() if len(line.split("#", 1)[0].split()) == 2}
    assert matrix.rewrite_pins(text, own, date) == (text, [])


def test_splice_writes_the_long_table_between_its_own_markers():
    begin, end = matrix.TABLES["long"]["markers"]
    readme = (f"{matrix.README_BEGIN}\nshort\n{matrix.README_END}\n"
              f"{begin}\n(no run yet)\n{end}\n")
    out = matrix.splice_readme("| long |\n", readme, (begin, end))
    assert out == f"{matrix.README_BEGIN}\nshort\n{matrix.README_END}\n{begin}\n| long |\n{end}\n"
    with pytest.raises(ValueError, match="test-long"):
        matrix.splice_readme("| long |\n", "no markers\n", (begin, end))


def test_the_long_list_adds_kernels_the_pins_do_not_boot():
    """test-kernels-long: each line a kernel of a release the matrix knows, with its Debian version,
    and none of them a pin of test-kernels (`make test` proves those already)."""
    pins = dict(matrix.listed())
    long = matrix.listed(matrix.LONG_LIST)
    assert long
    for suite, kver in long:
        assert suite in pins, f"{suite}: not a release of tests/kernel/test-kernels"
        assert kver != pins[suite], f"{kver} is the pin of {suite} already"
    for line in matrix.LONG_LIST.read_text().splitlines():
        if line.split("#", 1)[0].split():
            assert line.split("#", 1)[1].strip(), f"{line!r}: no Debian version after #"


def test_readme_long_table_was_written_by_a_run():
    """Between the test-long markers: the table `make test-long` wrote, one row per listed kernel."""
    begin, end = matrix.TABLES["long"]["markers"]
    text = README.read_text()
    block = text[text.index(begin) + len(begin):text.index(end)]
    assert block.lstrip("\n").startswith("<!-- produced by `make test-long` (tests/kernel/matrix.py)")
    for suite, kver in matrix.listed(matrix.LONG_LIST):
        assert f"| {kver} (" in block and f" | {suite} | " in block, f"{kver} is not in the README's test-long table"


def test_the_long_table_lists_each_system_scenario_test_in_run_order(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.installer.test_kernel_update" name="test_first" time="61.4"/>'
        '<testcase classname="tests.installer.test_kernel_update" name="test_second" time="2.0">'
        '<failure message="x">boom</failure></testcase>'
        '</testsuite></testsuites>')
    lines = matrix._scenario_lines([junit, tmp_path / "absent.xml"])
    assert lines[-4:] == ["| scenario | test | result | seconds |", "|---|---|---|---|",
                          "| test_kernel_update | test_first | pass | 61 |",
                          "| test_kernel_update | test_second | **FAIL** | 2 |"]
    assert matrix._scenario_lines([tmp_path / "absent.xml"])[-1] == "Not run (no build/matrix/system-long-*/junit.xml)."


def test_every_long_scenario_runs_in_a_test_long_group():
    """A module of tests/installer marked `long` is `make test-long`'s: one of its system groups names it
    (so that `make test`, which leaves `long` out, and `make test-long` between them run it)."""
    named = {arg for selection in matrix.LONG_SYSTEM_GROUPS.values() for arg in selection}
    marked = sorted(path.relative_to(matrix.REPO).as_posix()
                    for path in (matrix.REPO / "tests" / "installer").glob("test_*.py")
                    if "pytestmark = pytest.mark.long" in path.read_text())
    assert marked, "no scenario marked long"
    assert [path for path in marked if path not in named] == []
    for group, selection in matrix.SYSTEM_GROUPS.items():
        assert selection[:2] == ["-m", "system and not long"], group
