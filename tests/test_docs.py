"""Every command in the README is checked against the code it names, and every config key is documented.

A command is checked as far as it can be without its cluster, GPUs or models:
its program and script exist, its flags parse with the program's own argument
parser, and its config overrides load and pass the same validation that
`examples/train_dpo.py` runs before starting (placeholder paths such as
`/data/train.jsonl` or `/models/llama` are replaced by small real files of the
same kind). The commands also run for real elsewhere: the first two in CI and
tests/test_default_run.py, the Slurm template in tests/test_slurm.py, the
Dockerfile in tests/test_container.py, plot in tests/test_default_run.py,
prepare in tests/test_data_hh_rlhf.py and here (the HH-RLHF report, line for line),
convert in tests/test_hf_convert.py and tests/test_lora.py, the benchmark in
tests/test_bench.py, NeMo-Aligner's command in tests/test_aligner_command.py. Every
program's --help is checked here too.
"""

import argparse
import ast
import gzip
import json
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from omegaconf import DictConfig, OmegaConf
from torch.distributed.run import get_args_parser as torchrun_parser

from nemo_dpo.config import load_config, prepare
from nemo_dpo.data.default_task import DEFAULT_DATA_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
PLACEHOLDER_ROOTS = ("/data/", "/models/", "/runs/", "/ckpt/")


def readme_commands() -> list:
    """(line, argv) for every command in the README's bash blocks (``\\`` continuations joined, ``&&`` split)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in line.split("&&"):
                argv = [a for a in shlex.split(part, comments=True) if a != "..."]
                if argv:
                    commands.append((part.strip(), argv))
    return commands


def setup_extras() -> set:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return {key.value for key in node.value.keys}
    raise AssertionError("setup.py has no extras_require")


def load_script(path: str):
    """A script as a module, with its folder on sys.path as when it runs (bench scripts import their siblings)."""
    path = os.path.join(ROOT, path)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(path))
    return module


def dockerfile_cmd() -> list:
    """The Dockerfile's default command (its exec-form CMD)."""
    lines = [line for line in open(os.path.join(ROOT, "Dockerfile")) if line.startswith("CMD ")]
    assert len(lines) == 1, lines
    return json.loads(lines[0][4:])


class Fixtures:
    """Small real stand-ins for the README's placeholder paths, made on first use."""

    def __init__(self, folder):
        self.folder = folder
        self.made = {}

    def data(self, path: str) -> str:
        name = os.path.basename(path)
        target = os.path.join(self.folder, "data", name)
        if target not in self.made:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            source = os.path.join(DEFAULT_DATA_DIR, "train.jsonl")
            if name.endswith(".gz"):
                with open(source, "rb") as src, gzip.open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            elif name.endswith((".parquet", ".arrow")):
                import pyarrow as pa
                import pyarrow.parquet as pq

                table = pa.Table.from_pylist([json.loads(line) for line in open(source)])
                if name.endswith(".parquet"):
                    pq.write_table(table, target)
                else:
                    with pa.OSFile(target, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                        writer.write_table(table)
            else:
                shutil.copy(source, target)
            self.made[target] = True
        return target

    def hf_model(self, family: str = "llama") -> str:
        """A tiny Llama, or a tiny Mixtral for a placeholder that names one (mixture-of-experts commands)."""
        target = os.path.join(self.folder, f"hf_{family}")
        if target not in self.made:
            if family == "mixtral":
                from moe_fixtures import save_case

                save_case("mixtral", target)
            else:
                from hf_fixtures import save_tiny

                save_tiny("llama", target)
            self.made[target] = True
        return target

    def sentencepiece(self) -> str:
        target = os.path.join(self.folder, "tokenizer.model")
        if target not in self.made:
            from nemo_dpo.data.tokenizer import load_or_train_tokenizer

            trained = load_or_train_tokenizer(None, [os.path.join(DEFAULT_DATA_DIR, "train.jsonl")], 512,
                                              os.path.join(self.folder, "spm_cache"))
            shutil.copy(trained.model_path, target)
            self.made[target] = True
        return target

    def nemo(self) -> str:
        target = os.path.join(self.folder, "megatron_gpt_sft.nemo")
        if target not in self.made:
            from nemo_fixtures import save_config_only

            save_config_only(target, os.path.join(self.folder, "spm_cache"))
            self.made[target] = True
        return target

    def substitute(self, override: str) -> str:
        key, _, value = override.partition("=")
        if key.lstrip("+").startswith("model.data.data_prefix"):  # files, or lists: {train: [/data/a.jsonl], ...}
            files = re.sub(r"/data/[^,\]\s}]+", lambda path: self.data(path.group()), value)
            return f"{key}={files}"
        if not value.startswith(PLACEHOLDER_ROOTS):
            return override
        if key.lstrip("+") in ("model.restore_from_path", "pretrained_checkpoint.restore_from_path"):
            if value.endswith(".nemo"):
                value = self.nemo()
            else:
                value = self.hf_model("mixtral" if "mixtral" in value.lower() else "llama")
        elif key == "model.tokenizer.model":
            value = self.sentencepiece() if value.endswith(".model") else self.hf_model()
        else:  # output folders
            value = os.path.join(self.folder, "out", value.lstrip("/"))
        return f"{key}={value}"


def check_config(fixtures, config_name, overrides, world_size) -> None:
    """What examples/train_dpo.py does before init_distributed: load, adopt restore_from_path, validate."""
    overrides = [fixtures.substitute(o) for o in overrides]
    prepare(load_config(config_name, overrides), world_size)


def check_train_script(fixtures, argv, world_size) -> None:
    assert argv[0] == "examples/train_dpo.py", argv
    args = load_script("examples/train_dpo.py").build_parser().parse_args(argv[1:])
    check_config(fixtures, args.config_name, args.overrides, world_size)


def check_command(fixtures, argv) -> None:
    while re.fullmatch(r"[A-Z_]+=.*", argv[0]):  # VAR=value before the program
        argv = argv[1:]
    program, args = argv[0], argv[1:]
    if program == "mkdir":
        assert args[0] == "-p", argv
    elif program == "pip":
        assert args[0] == "install", argv
        extras = setup_extras()
        for spec in args[1:]:
            match = re.fullmatch(r"\.\[(.*)\]", spec)
            if match:
                assert set(match.group(1).split(",")) <= extras, f"{spec}: setup.py extras are {sorted(extras)}"
    elif program == "torchrun":
        parsed = torchrun_parser().parse_args(args)
        nnodes = int(str(parsed.nnodes).split(":")[-1])
        # "gpu" = every visible GPU: the README promises the default batch fits 1, 2, 4 or 8 of them
        per_node = [1, 2, 4, 8] if parsed.nproc_per_node == "gpu" else [int(parsed.nproc_per_node)]
        for nproc in per_node:
            check_train_script(fixtures, [parsed.training_script, *parsed.training_script_args], nproc * nnodes)
    elif program == "python" and args[0] == "-m":
        module = importlib.import_module(args[1])
        if args[1] == "pytest":
            assert args[2:] == ["-q", "tests"], argv  # CI's command; .ci/run is checked below
            return
        parsed = module.build_parser().parse_args(args[2:])
        if hasattr(parsed, "overrides"):
            check_config(fixtures, parsed.config_name, parsed.overrides, 1)
    elif program == "python":
        parsed = load_script(args[0]).build_parser().parse_args(args[1:])
        assert all("=" in o for o in getattr(parsed, "overrides", [])), argv
        for override in getattr(parsed, "ours", []):
            load_config("gpt_dpo", [override])
    elif program == "sbatch":
        script = next(a for a in args if a.endswith(".sbatch"))
        assert os.path.isfile(os.path.join(ROOT, script)), script
        overrides = args[args.index(script) + 1 :]
        load_config("gpt_dpo", [fixtures.substitute(o) for o in overrides])
    elif program == "docker":
        assert os.path.isfile(os.path.join(ROOT, "Dockerfile"))
        if args[0] == "run":  # docker run [options] IMAGE COMMAND...: the command inside is checked too
            inner = [i for i, a in enumerate(args) if a in ("torchrun", "python")]
            check_command(fixtures, args[inner[0]:] if inner else dockerfile_cmd())
    elif program == "tensorboard":
        assert importlib.util.find_spec("tensorboard") is not None
        assert args[0] == "--logdir", argv
    else:
        raise AssertionError(f"README command {' '.join(argv)!r}: no check for {program!r}; add one here")


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return Fixtures(str(tmp_path_factory.mktemp("doc_fixtures")))


@pytest.mark.parametrize("line,argv", COMMANDS, ids=[line[:70] for line, _ in COMMANDS])
def test_readme_command(fixtures, line, argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HOME", fixtures.folder)  # trained tokenizers are cached under ~
    check_command(fixtures, argv)


def test_readme_starts_with_the_run_and_the_ci_command():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert first_block[0].endswith("torchrun --nproc_per_node 2 examples/train_dpo.py")
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert first_block[1] in ci, (first_block[1], ci)


def config_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, DictConfig):
            yield from config_keys(value, f"{prefix}{key}.")
        else:
            yield prefix, key


def test_every_config_key_is_in_the_readme_key_table():
    """Each key of conf/gpt_dpo.yaml is named in the configuration table's row for its group."""
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    missing = []
    for group, key in config_keys(OmegaConf.load(os.path.join(ROOT, "conf", "gpt_dpo.yaml"))):
        full = f"{group}{key}"
        in_group_row = [row for row in rows if group and f"`{group.rstrip('.')}`" in row.split("|")[1]]
        if not any(f"`{full}`" in row for row in rows) and not any(f"`{key}`" in row for row in in_group_row):
            missing.append(full)
    assert not missing, f"README's configuration table does not name: {missing}"


def _parsers(parser):
    """A program's parser and its subcommands' parsers."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


PROGRAMS = {"examples/train_dpo.py": "nemo_dpo.cli.train", "python -m nemo_dpo.data.prepare": "nemo_dpo.cli.prepare",
            "python -m nemo_dpo.convert": "nemo_dpo.cli.convert", "python -m nemo_dpo.plot": "nemo_dpo.cli.plot"}


def test_help_explains_every_option_and_keeps_the_example_lines():
    """--help of every program: each option and subcommand says what it is, and the examples print as written (no
    line joined to the next by a backslash, which leaves a run of spaces where the break was)."""
    for program, module in PROGRAMS.items():
        for parser in _parsers(importlib.import_module(module).build_parser()):
            for action in parser._actions:
                assert action.help, f"{program}: {'/'.join(action.option_strings) or action.dest} has no help text"
            text = parser.format_help()
            for line in (parser.description or "").splitlines():
                assert line.rstrip() in text, (program, line)
                assert not re.search(r"\S {3,}[^\s#]", line), f"{program}: a run of spaces in {line!r}"


HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz")
HH_IN_README = "/data/hh-rlhf/harmless-base/test.jsonl.gz"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(HH), reason=f"{HH} not present (shared test data)")
def test_the_hh_rlhf_prepare_command_prints_what_the_readme_shows(tmp_path):
    """The README's prepare command for HH-RLHF, run on the real file, prints the README's report line for line."""
    (argv,) = [argv for _, argv in COMMANDS if "nemo_dpo.data.prepare" in argv and HH_IN_README in argv]
    shown = re.search(rf"```\n(== {re.escape(HH_IN_README)}\n.*?)```", README, re.S).group(1).splitlines()
    command = [sys.executable if a == "python" else HH if a == HH_IN_README else a for a in argv]
    ran = subprocess.run([*command, f"model.tokenizer.cache_dir={tmp_path}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    printed = ran.stdout.replace(HH, HH_IN_README).splitlines()
    assert printed[printed.index(shown[0]):] == shown, ran.stdout + ran.stderr
    assert ran.returncode == 1  # the 9 bad records, under on_bad_record=error
