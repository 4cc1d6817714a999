import os
import sys

# Spawned test processes import the helpers in this folder by module name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402

# Two layers run by default: the unit layer and the multi-process layer (`slow`). A third, `system`, holds the
# scenarios that take minutes each (random faults over a long run, NeMo-Aligner's 8-process command, a Slurm
# cluster, every signal and NaN path of a resume): `--system` runs them as well. They are skipped by default, with
# the reason, so that `python -m pytest -q tests` (what CI runs) stays within its time on 2 CPU cores.


def pytest_addoption(parser):
    parser.addoption("--system", action="store_true", help="also run the tests marked system (minutes each)")


# pytest.ini runs the suite on two pytest-xdist workers (--dist loadgroup): a 2-rank job keeps both cores busy only
# while it steps, and much of a launch is one process importing, a store waiting or a Slurm job queueing. A file
# is one group, so that its module-scoped launches run once, on one worker; the files that read the session's
# shared data launch (the fixture below) are one group for the same reason. Files with multi-process tests are
# handed out first and the unit files fill in behind them, so that the two workers finish near each other.
SHARED_LAUNCH = "data_training_runs"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the groups into node ids
def pytest_collection_modifyitems(config, items):
    sharing = {item.path.stem for item in items if SHARED_LAUNCH in getattr(item, "fixturenames", ())}

    def group(item):
        return SHARED_LAUNCH if item.path.stem in sharing else item.path.stem

    multi_process = {group(item) for item in items if "slow" in item.keywords}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    items.sort(key=lambda item: group(item) not in multi_process)
    if config.getoption("--system"):
        return
    later = pytest.mark.skip(reason="system layer: run with --system")
    for item in items:
        if "system" in item.keywords:
            item.add_marker(later)


@pytest.fixture(scope="session")
def data_training_runs(tmp_path_factory):
    """The data tests' training runs, ``{job name: Run}``: one 2-process launch, for the first test that asks
    (tests/data_training_runs.py)."""
    from data_training_runs import run_all  # here, not above: sessions without those tests skip its imports (torch)

    return run_all(tmp_path_factory.mktemp("data_training_runs"))
