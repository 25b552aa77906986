"""Per-test time budget for the suite (registered by ``tests/conftest.py``).

The run fails (exit status 1, offenders and their seconds in the terminal summary) when one
test's setup + call takes longer than ``JAXATTN_TEST_BUDGET_S`` seconds (default 30; ``0`` turns
the check off). A test that genuinely needs longer says so with
``@pytest.mark.budget(seconds, reason="...")``: it is then held to its own limit, and the total
time of all such tests is reported. Durations come from the test reports, which the xdist
controller receives for every test of every worker, so the check sees the whole run.
"""

import os

import pytest

# ---- per-test time budget ----------------------------------------------------------------------
BUDGET_ENV = "JAXATTN_TEST_BUDGET_S"
DEFAULT_BUDGET_S = 30.0
_MARKED_LIMIT = "budget_limit_s"  # user_properties key: travels with the report from a worker
_TIMED_PHASES = ("setup", "call")


class _BudgetLedger:
    """Seconds spent per test (setup + call) and the limits they are held to."""

    def __init__(self, default_limit_s: float):
        self.default_limit_s = default_limit_s
        self.seconds: dict[str, float] = {}
        self.marked_limit_s: dict[str, float] = {}

    def add(self, report) -> None:
        if report.when not in _TIMED_PHASES:
            return
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration
        for key, value in report.user_properties:
            if key == _MARKED_LIMIT:
                self.marked_limit_s[report.nodeid] = float(value)

    def limit_s(self, nodeid: str) -> float:
        return self.marked_limit_s.get(nodeid, self.default_limit_s)

    def offenders(self) -> list[tuple[str, float, float]]:
        """``(nodeid, seconds, limit)`` of every test over its limit, slowest first."""
        over = [(n, s, self.limit_s(n)) for n, s in self.seconds.items() if s > self.limit_s(n)]
        return sorted(over, key=lambda row: -row[1])

    def marked_total_s(self) -> float:
        return sum(self.seconds.get(n, 0.0) for n in self.marked_limit_s)


def _budget_from_env() -> float:
    raw = os.environ.get(BUDGET_ENV, "")
    if not raw:
        return DEFAULT_BUDGET_S
    try:
        value = float(raw)
    except ValueError:
        raise pytest.UsageError(f"{BUDGET_ENV}={raw!r}: expected seconds (a number)") from None
    if value < 0:
        raise pytest.UsageError(f"{BUDGET_ENV}={raw!r}: expected seconds >= 0 (0 disables)")
    return value


def _marked_limit(item) -> float | None:
    """The limit of a ``budget``-marked test; a usage error when its seconds or reason is
    missing."""
    mark = item.get_closest_marker("budget")
    if mark is None:
        return None
    seconds = mark.args[0] if mark.args else mark.kwargs.get("seconds")
    reason = mark.kwargs.get("reason", "")
    if not isinstance(seconds, int | float) or seconds <= 0 or not str(reason).strip():
        raise pytest.UsageError(
            f"{item.nodeid}: write @pytest.mark.budget(seconds, reason='why it needs longer'); "
            f"got args={mark.args}, kwargs={mark.kwargs}")
    return float(seconds)


class _TestBudget:
    """Plugin object (one per pytest run): collects the durations and enforces the limits.

    Not named Test*: pytest would try to collect it."""

    def __init__(self, config):
        self.config = config
        self.ledger = _BudgetLedger(_budget_from_env())
        self.worker = hasattr(config, "workerinput")  # an xdist worker: the controller checks

    def enforced(self) -> bool:
        return self.ledger.default_limit_s > 0 and not self.worker

    def pytest_collection_modifyitems(self, items):
        for item in items:
            limit = _marked_limit(item)
            if limit is not None:
                item.user_properties.append((_MARKED_LIMIT, limit))

    def pytest_runtest_logreport(self, report):
        self.ledger.add(report)

    def pytest_sessionfinish(self, session, exitstatus):
        if self.enforced() and self.ledger.offenders() and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if self.worker:
            return
        offenders = self.ledger.offenders() if self.enforced() else []
        if offenders:
            self._report_offenders(terminalreporter, offenders)
        if self.ledger.marked_limit_s:
            terminalreporter.write_line(
                f"test budget: {len(self.ledger.marked_limit_s)} budget-marked test(s) took "
                f"{self.ledger.marked_total_s():.1f} s in total")

    def _report_offenders(self, terminalreporter, offenders):
        terminalreporter.section("test budget exceeded", sep="=", red=True)
        terminalreporter.write_line(
            f"{len(offenders)} test(s) over the per-test limit (setup + call; {BUDGET_ENV}="
            f"{self.ledger.default_limit_s:g} s, or the test's own @pytest.mark.budget):")
        for nodeid, seconds, limit in offenders:
            terminalreporter.write_line(f"  {seconds:7.2f} s > {limit:g} s  {nodeid}")
        terminalreporter.write_line(
            "Make the test cheaper (README 'Tests'), or mark it "
            "@pytest.mark.budget(seconds, reason='...') if it genuinely needs longer.")

def pytest_configure(config):
    config.pluginmanager.register(_TestBudget(config), "jaxattn_test_budget")
