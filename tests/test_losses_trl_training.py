"""4 optimizer steps of nemo-dpo equal 4 steps of TRL's own trainers, loss by loss (one process per framework).

The same tiny Hugging Face Llama, tokenizer, pairs, order, AdamW and fp32 go to
both (tests/trl_training_scenarios.py); the loss and the mean chosen and
rejected rewards of every step must agree within 2e-5 for sigmoid, hinge,
robust, apo_zero, bco_pair (DPOTrainer), simpo (CPOTrainer), orpo
(ORPOTrainer) and kto (KTOTrainer, on unpaired examples: the desirable and
undesirable rewards and the KL estimate). The steps after the first check the
gradients too: they decide the weights the later losses are computed with.
"""

import json
import os
import subprocess
import sys

import pytest

import trl_training_scenarios as scenarios

pytestmark = pytest.mark.slow  # two training processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "trl_training_scenarios.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trl_training")
    scenarios.write_workload(str(folder))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}

    def start(name):
        return subprocess.Popen([sys.executable, SCRIPT, name, str(folder), str(folder / f"{name}.json")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=folder)

    procs = {name: start(name) for name in ("nemo_dpo", "trl")}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        if name == "trl" and proc.returncode < 0:
            # TRL's process (no nemo-dpo code in it) once died of SIGSEGV next to a busy test worker, and passed
            # when run again: the oracle gets one more run, alone. nemo-dpo's process gets none.
            proc = start(name)
            out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}:\n{out[-4000:]}"
    return {name: json.loads((folder / f"{name}.json").read_text()) for name in procs}


@pytest.mark.parametrize("loss", list(scenarios.LOSSES))
def test_four_steps_equal_trls_trainer(runs, loss):
    ours, theirs = runs["nemo_dpo"][loss], runs["trl"][loss]
    assert len(ours) == len(theirs) == scenarios.STEPS
    for step, (got, want) in enumerate(zip(ours, theirs), start=1):
        assert got.keys() == want.keys(), f"{loss} step {step}"
        for key in got:
            assert got[key] == pytest.approx(want[key], rel=2e-5, abs=2e-5), f"{loss} step {step} {key}"
    assert ours[-1]["loss"] != ours[0]["loss"]  # the steps trained
