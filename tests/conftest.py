"""
Hypothesis profiles, chosen with the HYPOTHESIS_PROFILE environment variable:
"ci" (the default) keeps the whole unit run quick; "fuzz" (make fuzz) runs
the property tests long enough to find rare inputs.
"""

import os

from hypothesis import settings

settings.register_profile("ci", max_examples=100, deadline=None)
settings.register_profile("fuzz", max_examples=200_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---------------------------------------------------------------------------
# Unhandled errors fail the test that logged them.

import gc  # noqa: E402

import pytest  # noqa: E402
from twisted.logger import LogLevel, formatEvent, globalLogPublisher  # noqa: E402

#: Twisted's own words for an error nobody handled (a Deferred's failure
#: that was never consumed, an exception out of a reactor callback).
UNHANDLED_MARKERS = ("Unhandled error in Deferred", "Unhandled Error")


def is_unhandled_error(event: dict) -> bool:
    """
    Whether a Twisted log event reports an unhandled error: Twisted's
    "Unhandled error in Deferred" and "Unhandled Error", anything logged at
    critical level, legacy C{log.err} calls, and failures logged at error
    level or above (C{log.failure} defaults to critical).
    """
    level = event.get("log_level")
    if level == LogLevel.critical or event.get("isError"):
        return True
    if "log_failure" in event and level is not None and level >= LogLevel.error:
        return True
    text = event.get("log_format") or ""
    return any(marker in text for marker in UNHANDLED_MARKERS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "unhandled_errors_expected: the test provokes an unhandled error on purpose"
        " (its assertions say which); the fixture does not fail it",
    )


@pytest.fixture(autouse=True)
def fail_on_unhandled_errors(request: pytest.FixtureRequest):
    """
    Fail any test during which an error was logged as unhandled: such an
    error is otherwise only a log line, and the test passes.
    """
    caught: list[dict] = []

    def observe(event: dict) -> None:
        if is_unhandled_error(event):
            caught.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield caught
        # A Deferred reports its unhandled failure when it is collected.
        # Everything still alive is then frozen, so the next test's
        # collection scans only what that test created (a full collection
        # per test would triple the unit run).
        gc.collect()
        gc.freeze()
    finally:
        globalLogPublisher.removeObserver(observe)
    if caught and request.node.get_closest_marker("unhandled_errors_expected") is None:
        details = []
        for event in caught:
            text = formatEvent(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            details.append(text)
        pytest.fail("unhandled error(s) logged during the test:\n" + "\n\n".join(details),
                    pytrace=False)
