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


def pytest_collection_modifyitems(config, items):
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
