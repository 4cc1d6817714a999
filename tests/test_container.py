"""The Dockerfile, checked without a Docker engine: parsed with dockerfile-parse, its COPY,
WORKDIR, RUN and CMD steps replayed on paths against the repository as the build context."""

import glob
import io
import json
import os
import posixpath
import re
import shlex
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}
NGC_PYTORCH = re.compile(r"nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3")
# The NGC image megatron-core 0.16 and 0.17 are tested on (Python 3.12, transformer-engine, apex).
OLDEST_NGC = (25, 9)
PACKAGE_DIRS = ("nemo_dpo", "conf")  # the configs are read from conf/ next to the package


def _argv(value: str, line: int, what: str, problems: list):
    """An instruction's arguments: the JSON (exec) form if it is one, else shell words."""
    if value.lstrip().startswith("["):
        try:
            argv = json.loads(value)
        except json.JSONDecodeError as err:
            problems.append(f"line {line}: {what} is not a valid JSON array ({err})")
            return []
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            problems.append(f"line {line}: {what} must be a JSON array of strings")
            return []
        return argv
    return shlex.split(value)


def _copy(image: dict, args: list, workdir: str, line: int, context: str, problems: list) -> None:
    """Replay COPY/ADD: map each image path it creates to the build-context file it comes from."""
    if any(a.startswith("--from") for a in args):
        problems.append(f"line {line}: COPY --from (multi-stage) is not replayed by this check")
        return
    args = [a for a in args if not a.startswith("--")]
    if len(args) < 2:
        problems.append(f"line {line}: COPY needs a source and a destination")
        return
    sources, dest = args[:-1], args[-1]
    dest_abs = posixpath.normpath(posixpath.join(workdir, dest))
    into_dir = dest.endswith("/") or dest in (".", "..") or len(sources) > 1 or any(
        p.startswith(dest_abs + "/") for p in image)
    for src in sources:
        real = os.path.realpath(os.path.join(context, src))
        if real != context and not real.startswith(context + os.sep):
            problems.append(f"line {line}: COPY source {src!r} is outside the build context")
            continue
        matches = sorted(glob.glob(os.path.join(context, src)))
        if not matches:
            problems.append(f"line {line}: COPY source {src!r} does not exist in the repository")
            continue
        for match in matches:
            if os.path.isdir(match):  # a folder's contents go into the destination
                for folder, _, files in os.walk(match):
                    for name in files:
                        rel = os.path.relpath(os.path.join(folder, name), match).replace(os.sep, "/")
                        image[posixpath.join(dest_abs, rel)] = os.path.join(folder, name)
            else:
                target = posixpath.join(dest_abs, os.path.basename(match)) if into_dir or len(matches) > 1 else dest_abs
                image[target] = match


def _installs_context(command: str) -> bool:
    """Whether a RUN command pip-installs the package in its working directory (``.``, ``-e .[extra]``)."""
    for part in re.split(r"&&|\|\||;", command):
        words = shlex.split(part)
        if "install" not in words:
            continue
        head, args = words[: words.index("install")], words[words.index("install") + 1 :]
        pip = any(posixpath.basename(w) in ("pip", "pip3") for w in head) or ("-m" in head and "pip" in head)
        if pip and any(re.fullmatch(r"\.(\[[\w,-]+\])?", w) for w in args):
            return True
    return False


def problems_in(text: str, context: str = ROOT) -> list:
    """Everything that would keep this Dockerfile from building nemo-dpo and running its example."""
    problems = []
    structure = [s for s in DockerfileParser(fileobj=io.BytesIO(text.encode())).structure
                 if s["instruction"] != "COMMENT"]
    if not structure:
        return ["no instructions"]
    for s in structure:
        if s["instruction"] not in INSTRUCTIONS:
            problems.append(f"line {s['startline'] + 1}: unknown instruction {s['instruction']}")
    froms = [s for s in structure if s["instruction"] == "FROM"]
    first = next(s for s in structure if s["instruction"] != "ARG")
    if first["instruction"] != "FROM" or len(froms) != 1:
        problems.append(f"expected one FROM as the first instruction, found {len(froms)} (first: {first['instruction']})")
        return problems
    base = froms[0]["value"].split()[0]
    ngc = NGC_PYTORCH.fullmatch(base)
    if not ngc:
        problems.append(f"base image {base!r} is not NVIDIA's NGC PyTorch image (nvcr.io/nvidia/pytorch:YY.MM-py3)")
    elif (int(ngc.group(1)), int(ngc.group(2))) < OLDEST_NGC:
        problems.append(f"base image {base!r} is older than {OLDEST_NGC[0]}.{OLDEST_NGC[1]:02d}, the oldest NGC "
                        f"PyTorch image megatron-core 0.16/0.17 are tested on")

    image, workdir, installed_at, command, entrypoint = {}, "/", None, None, []
    for s in structure:
        op, value, line = s["instruction"], s["value"], s["startline"] + 1
        if op == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, value))
        elif op in ("COPY", "ADD"):
            _copy(image, shlex.split(value), workdir, line, os.path.realpath(context), problems)
        elif op == "RUN" and _installs_context(value):
            missing = [f for f in ("setup.py", "nemo_dpo/__init__.py") if posixpath.join(workdir, f) not in image]
            if missing:
                problems.append(f"line {line}: `pip install` of {workdir} runs before {', '.join(missing)} is copied there")
            else:
                installed_at = workdir
        elif op == "CMD":
            command = (_argv(value, line, "CMD", problems), workdir)
        elif op == "ENTRYPOINT":
            entrypoint = _argv(value, line, "ENTRYPOINT", problems)

    if installed_at is None:
        if not any("pip install" in p for p in problems):
            problems.append("the package is never installed (no RUN `pip install .` or `pip install -e .` "
                            "where setup.py and nemo_dpo/ were copied)")
    else:
        for folder in PACKAGE_DIRS:
            for dirpath, _, files in os.walk(os.path.join(context, folder)):
                for name in files:
                    rel = os.path.relpath(os.path.join(dirpath, name), context).replace(os.sep, "/")
                    if "__pycache__" not in rel and posixpath.join(installed_at, rel) not in image:
                        problems.append(f"{rel} is not in the image at {installed_at}")
    argv, cmd_workdir = command if command else ([], workdir)
    argv = entrypoint + argv
    launcher = argv[:1] == ["torchrun"] or argv[:3] in (["python", "-m", "torch.distributed.run"],
                                                        ["python3", "-m", "torch.distributed.run"])
    scripts = [a for a in argv if a.endswith(".py")]
    if not launcher or not scripts:
        problems.append(f"the default command {argv} does not run a script with torchrun")
    for script in scripts:
        source = image.get(posixpath.normpath(posixpath.join(cmd_workdir, script)))
        expected = os.path.join(os.path.realpath(context), "examples", "train_dpo.py")
        if source is None or os.path.realpath(source) != expected or not os.path.isfile(expected):
            problems.append(f"the default command runs {script} in {cmd_workdir}, which is not the repository's "
                            f"examples/train_dpo.py copied into the image")
    return problems


def test_the_dockerfile_builds_nemo_dpo_on_ngc_pytorch_and_runs_the_example():
    assert problems_in(Path(DOCKERFILE).read_text()) == []


def mutated(old: str, new: str) -> str:
    text = Path(DOCKERFILE).read_text()
    assert old in text, f"the Dockerfile no longer contains {old!r}: update this test's mutation"
    return text.replace(old, new, 1)


@pytest.mark.parametrize("old, new, expected", [
    ("FROM nvcr.io/nvidia/pytorch:25.09-py3", "FROM python:3.12-slim", "is not NVIDIA's NGC PyTorch image"),
    ("FROM nvcr.io/nvidia/pytorch:25.09-py3", "FROM nvcr.io/nvidia/pytorch:24.05-py3", "is older than 25.09"),
    ('RUN pip install --no-cache-dir -e ".[test]"', "RUN true", "the package is never installed"),
    ('RUN pip install --no-cache-dir -e ".[test]"', 'RUN pip install --no-cache-dir "megatron-core<0.18"',
     "the package is never installed"),
    ("COPY nemo_dpo ./nemo_dpo\n", "", "runs before nemo_dpo/__init__.py is copied there"),
    ("COPY conf ./conf\n", "", "conf/gpt_dpo.yaml is not in the image"),
    ("COPY conf ./conf\n", "COPY config ./conf\n", "COPY source 'config' does not exist in the repository"),
    ("COPY examples ./examples\n", "", "which is not the repository's examples/train_dpo.py"),
    ("COPY examples ./examples\n", "COPY ../examples ./examples\n", "is outside the build context"),
    ('"examples/train_dpo.py"]', '"examples/train.py"]', "runs examples/train.py"),
    ('"examples/train_dpo.py"]', "examples/train_dpo.py]", "CMD is not a valid JSON array"),
    ('CMD ["torchrun", "--nproc-per-node=gpu", ', 'CMD ["bash", ', "does not run a script with torchrun"),
    ("WORKDIR /workspace/nemo-dpo", "WORKDIRR /workspace/nemo-dpo", "unknown instruction WORKDIRR"),
])
def test_each_check_catches_its_breakage(old, new, expected):
    found = problems_in(mutated(old, new))
    assert any(expected in p for p in found), found


def test_the_pip_install_must_come_after_the_copies():
    text = mutated('RUN pip install --no-cache-dir -e ".[test]"\n', "")
    text = text.replace("WORKDIR /workspace/nemo-dpo\n", 'WORKDIR /workspace/nemo-dpo\nRUN pip install -e .\n', 1)
    assert any("runs before setup.py, nemo_dpo/__init__.py is copied there" in p for p in problems_in(text))
