"""The per-test time budget (tests/budget_plugin.py), run on fake tests with pytester.

The inner runs load the real plugin the suite's conftest registers (without jax) and a limit of
0.2 s; the slow fake test sleeps 0.3 s.
"""

import pathlib

import pytest

pytest_plugins = ["pytester"]

HERE = pathlib.Path(__file__).parent
CONFTEST = "from budget_plugin import pytest_configure  # noqa: F401\n"
LIMIT_S = "0.2"
INI = """
[pytest]
markers =
    budget(seconds, reason): may take up to `seconds`
"""
FAKE_TESTS = """
import time
import pytest

def test_fast():
    pass

def test_sleeps_past_the_limit():
    time.sleep(0.3)

@pytest.mark.budget(5, reason="fake: needs longer than the 0.2 s limit")
def test_marked_sleeps_within_its_budget():
    time.sleep(0.3)
"""


# The inner runs need none of the suite's other plugins (hypothesis' summary alone costs seconds).
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:jaxtyping")


@pytest.fixture
def fake_suite(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    monkeypatch.syspath_prepend(str(HERE))  # in-process runs import the plugin from here
    monkeypatch.setenv("PYTHONPATH", str(HERE))  # and so do subprocess runs and xdist workers
    monkeypatch.setenv("JAXATTN_TEST_BUDGET_S", LIMIT_S)
    return pytester


def test_slow_test_fails_the_run_and_is_named(fake_suite):
    fake_suite.makepyfile(test_fake=FAKE_TESTS)
    result = fake_suite.runpytest(*QUIET)
    result.assert_outcomes(passed=3)  # every test passed, the budget alone fails the run
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*test budget exceeded*",
        "*1 test(s) over the per-test limit*JAXATTN_TEST_BUDGET_S=0.2 s*",
        "*s > 0.2 s  test_fake.py::test_sleeps_past_the_limit",
        "*test budget: 1 budget-marked test(s) took * s in total*",
    ])
    over = [line for line in result.outlines if " s > " in line]
    assert len(over) == 1, over  # the marked test (same sleep, own budget 5 s) is not listed


def test_budget_marked_and_fast_tests_pass(fake_suite):
    fake_suite.makepyfile(test_fake=FAKE_TESTS)
    result = fake_suite.runpytest(*QUIET, "-k", "not past_the_limit")
    result.assert_outcomes(passed=2, deselected=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*test budget: 1 budget-marked test(s) took * s in total*"])
    result.stdout.no_fnmatch_line("*test budget exceeded*")


def test_zero_disables_the_limit(fake_suite, monkeypatch):
    fake_suite.makepyfile(test_fake=FAKE_TESTS)
    monkeypatch.setenv("JAXATTN_TEST_BUDGET_S", "0")
    result = fake_suite.runpytest(*QUIET)
    result.assert_outcomes(passed=3)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.no_fnmatch_line("*test budget exceeded*")


def test_setup_time_counts_toward_the_limit(fake_suite):
    """A slow fixture (e.g. compiling a shared program) is charged to the test that pays it."""
    fake_suite.makepyfile(test_fake="""
import time
import pytest

@pytest.fixture(scope="module")
def expensive():
    time.sleep(0.3)

def test_pays_the_fixture(expensive):
    pass
""")
    result = fake_suite.runpytest(*QUIET)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*s > 0.2 s  test_fake.py::test_pays_the_fixture"])


def test_marker_without_reason_is_a_usage_error(fake_suite):
    fake_suite.makepyfile(test_fake="""
import pytest

@pytest.mark.budget(60)
def test_no_reason():
    pass
""")
    result = fake_suite.runpytest(*QUIET)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_no_reason*budget(seconds, reason=*"])


def test_bad_env_value_is_a_usage_error(fake_suite, monkeypatch):
    fake_suite.makepyfile(test_fake=FAKE_TESTS)
    monkeypatch.setenv("JAXATTN_TEST_BUDGET_S", "thirty")
    result = fake_suite.runpytest(*QUIET)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*JAXATTN_TEST_BUDGET_S='thirty'*seconds*"])


def test_workers_are_aggregated_on_the_xdist_controller(fake_suite):
    """Under xdist the tests run in worker processes; the controller still names the offender."""
    pytest.importorskip("xdist")
    fake_suite.makepyfile(test_fake=FAKE_TESTS)
    result = fake_suite.runpytest_subprocess(*QUIET, "-n", "2")
    result.assert_outcomes(passed=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*s > 0.2 s  test_fake.py::test_sleeps_past_the_limit"])
    over = [line for line in result.outlines if " s > " in line]
    assert len(over) == 1, over
