"""Which test modules a `-m` expression lets pytest leave unimported (tests/conftest.py's
`pytest_ignore_collect`): only those none of whose tests it could select, whatever marks each
test has besides the ones its module's `pytestmark` gives them all."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, module_marks, unselectable

CHECK, INTEGRATION = "not integration and not slow", "integration or slow"


def module(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "test_probe.py"
    path.write_text("import pytest\n\n" + text + "\n\ndef test_x():\n    pass\n")
    return path


CASES = [  # a module's text, the marks it gives every test, the expressions that leave it out
    ("", set(), set()),
    ("pytestmark = pytest.mark.docker", {"docker"}, {CHECK}),
    ("pytestmark = [pytest.mark.integration, pytest.mark.xdist_group('g')]",
     {"integration", "xdist_group"}, {CHECK}),
    ("pytestmark = pytest.mark.slow", {"slow"}, {CHECK, "not slow"}),
    ("pytestmark = pytest.mark.xdist_group('built-house')", {"xdist_group"}, set()),
    # The last assignment is the one pytest sees.
    ("pytestmark = pytest.mark.docker\npytestmark = pytest.mark.slow", {"slow"},
     {CHECK, "not slow"}),
    # Set in a block or added to: only importing would tell, so nothing is left out.
    ("if True:\n    pytestmark = pytest.mark.docker", set(), set()),
    ("pytestmark = [pytest.mark.slow]\npytestmark += [pytest.mark.docker]", set(), set()),
    ("class TestX:\n    pytestmark = pytest.mark.docker\npytestmark = pytest.mark.slow",
     set(), set()),
]  # fmt: skip


@pytest.mark.parametrize(("text", "marks", "skipped_by"), CASES)
def test_a_module_is_left_out_only_where_no_test_of_it_could_be_selected(
    tmp_path, text, marks, skipped_by
):
    path = module(tmp_path, text)
    assert module_marks(path) == marks
    for expression in (CHECK, INTEGRATION, "not slow", "docker", "not slow(reason='x')"):
        assert unselectable(path, expression) == (expression in skipped_by), expression


def test_the_two_tiers_leave_out_no_module_both_would():
    """Every module is imported by `make check` or by the integration tier (or both), so a test
    left out of one tier is always in the other."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        assert not (unselectable(path, CHECK) and unselectable(path, INTEGRATION)), path.name
