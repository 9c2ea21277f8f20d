"""A pytest plugin for tests/run_mutmut.py only: the cheapest tests run first.

mutmut stops a mutant's tests at the first failure, so a mutant that a quick test kills should not wait
for an expensive fixture (a whole run of the script) that a later test needs.  A test's cost is its own
time plus the set-up time of every fixture it uses, measured once before mutmut starts."""

import json
import math
import os
import time
from pathlib import Path

import pytest

COSTS = Path(__file__).with_name("mutmut-test-costs.json")
RECORDING = os.environ.get("MUTMUT_RECORD_TEST_COSTS") == "1"
fixture_seconds: dict[tuple[str, str], float] = {}
call_seconds: dict[str, float] = {}


def fixture_cost(nodeid: str, name: str) -> float:
    """The set-up time of the fixture a test sees under `name`: the definition closest to the test."""
    visible = [(len(base), seconds) for (base, argname), seconds in fixture_seconds.items()
               if argname == name and nodeid.startswith(base)]
    return max(visible)[1] if visible else 0.0


if RECORDING:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(fixturedef):
        start = time.perf_counter()
        yield
        key = (fixturedef.baseid, fixturedef.argname)
        fixture_seconds[key] = max(fixture_seconds.get(key, 0.0), time.perf_counter() - start)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item):
        start = time.perf_counter()
        yield
        call_seconds[item.nodeid] = time.perf_counter() - start

    def pytest_sessionfinish(session):
        costs = {item.nodeid: call_seconds.get(item.nodeid, 0.0)
                 + sum(fixture_cost(item.nodeid, name) for name in getattr(item, "fixturenames", ()))
                 for item in session.items}
        COSTS.write_text(json.dumps(costs, indent=0, sort_keys=True))
else:
    def pytest_collection_modifyitems(items):
        costs = json.loads(COSTS.read_text()) if COSTS.exists() else {}
        items.sort(key=lambda item: costs.get(item.nodeid, math.inf))
