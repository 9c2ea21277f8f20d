"""A pytest plugin for tests/run_mutmut.py only (it becomes the copy's root conftest.py).

1. Every test that uses a fixture runs for the mutants of the functions that fixture calls.  mutmut maps
   a function to the tests during which it was called, so a function called while a shared fixture (a
   whole run of the script) is set up was mapped to the first test using it alone, and a mutant that
   only a later test of the same fixture would notice survived unseen.
2. The cheapest tests run first.  mutmut stops a mutant's tests at the first failure, so a mutant that a
   quick test kills should not wait for an expensive fixture that a later test needs.  A test's cost is
   its own time plus the set-up time of every fixture it uses, measured once before mutmut starts."""

import json
import math
import os
import time
from pathlib import Path

import pytest
from mutmut.state import state

COSTS = Path(__file__).with_name("mutmut-test-costs.json")
RECORDING = os.environ.get("MUTMUT_RECORD_TEST_COSTS") == "1"
fixture_seconds: dict[tuple[str, str], float] = {}
fixture_calls: dict[tuple[str, str], set[str]] = {}
call_seconds: dict[str, float] = {}


def seen_by(nodeid: str, name: str, per_fixture: dict, missing):
    """What was recorded for the fixture a test sees under `name` (the definition closest to the test),
    or `missing`."""
    visible = [(len(base), value) for (base, argname), value in per_fixture.items()
               if argname == name and nodeid.startswith(base)]
    return max(visible, key=lambda pair: pair[0])[1] if visible else missing


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef):
    """Time the fixture's set-up and keep apart the script's functions it calls (mutmut records the
    calls of the current test in state()._stats; the fixtures it depends on are set up before this)."""
    calls = state()._stats
    before = set(calls)
    calls.clear()
    start = time.perf_counter()
    yield
    key = (fixturedef.baseid, fixturedef.argname)
    fixture_seconds[key] = max(fixture_seconds.get(key, 0.0), time.perf_counter() - start)
    fixture_calls.setdefault(key, set()).update(calls)
    calls.update(before)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item):
    """Before mutmut maps this test's calls: add those of every fixture it uses, set up now or before."""
    for name in getattr(item, "fixturenames", ()):
        state()._stats.update(seen_by(item.nodeid, name, fixture_calls, set()))


if RECORDING:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item):
        start = time.perf_counter()
        yield
        call_seconds[item.nodeid] = time.perf_counter() - start

    def pytest_sessionfinish(session):
        costs = {item.nodeid: call_seconds.get(item.nodeid, 0.0)
                 + sum(seen_by(item.nodeid, name, fixture_seconds, 0.0) for name in getattr(item, "fixturenames", ()))
                 for item in session.items}
        COSTS.write_text(json.dumps(costs, indent=0, sort_keys=True))
else:
    def pytest_collection_modifyitems(items):
        costs = json.loads(COSTS.read_text()) if COSTS.exists() else {}
        items.sort(key=lambda item: costs.get(item.nodeid, math.inf))
