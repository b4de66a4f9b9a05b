"""
The autouse fixture in tests/conftest.py fails a test during which an error
was logged as unhandled, and only such a test.  The inner tests run in this
process, so their errors reach this test's own fixture too: these tests are
marked as expecting them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent.parent / "conftest.py").read_text()


@pytest.mark.unhandled_errors_expected  # the inner test's, on purpose
@pytest.mark.parametrize(
    "body, outcome",
    [
        # A Deferred whose failure nobody consumed, reported when collected.
        ("d = Deferred()\n    d.errback(RuntimeError('lost'))\n    del d", "failed"),
        # An exception raised inside a callback on the request path.
        ("d = Deferred()\n    d.addCallback(lambda _: 1 / 0)\n    d.callback(None)\n    del d",
         "failed"),
        ("Logger().failure('boom', Failure(ValueError('x')))", "failed"),
        ("Logger().critical('critical event')", "failed"),
        ("log.err(ValueError('legacy'))", "failed"),
        # Handled failures and ordinary warnings do not fail a test.
        ("d = Deferred()\n    d.addErrback(lambda f: None)\n    d.errback(RuntimeError('ok'))",
         "passed"),
        ("Logger().warn('a warning')", "passed"),
    ],
)
def test_fixture_fails_only_unhandled_errors(pytester: pytest.Pytester, body: str,
                                             outcome: str) -> None:
    """Each kind of unhandled error fails the test; handled ones do not."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(f"""
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import log
from twisted.python.failure import Failure

def test_inner():
    {body}
""")
    result = pytester.runpytest_inprocess()
    if outcome == "failed":
        # The fixture fails the test in its teardown: pytest reports an error.
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(["*unhandled error(s) logged during the test*"])
    else:
        result.assert_outcomes(passed=1)


@pytest.mark.unhandled_errors_expected  # the inner test's, on purpose
def test_marker_allows_an_expected_error(pytester: pytest.Pytester) -> None:
    """A test marked unhandled_errors_expected is not failed by the fixture."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile("""
import pytest
from twisted.logger import Logger

@pytest.mark.unhandled_errors_expected
def test_inner():
    Logger().critical('expected')
""")
    pytester.runpytest_inprocess().assert_outcomes(passed=1)
