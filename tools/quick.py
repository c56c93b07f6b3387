"""Run the pipeline as a DVC experiment with the overrides of a file (``make quick``).

    python -m tools.quick [FILE] [--dry]     (FILE: default quick.yaml)

FILE maps dotted params.yaml keys to values (``train.epochs: 5``). They are checked against
params.yaml's schema first (one line and exit 2 for a bad key or value), then passed to
``dvc exp run -n <FILE's stem>-<time> -S key=value ...``, which writes them into params.yaml, runs the stages
whose inputs changed and records the experiment (``dvc exp show``). ``--dry`` prints the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from diffusion.process import make_process
from pipeline.params import PARAMS_FILE, ParamsError, read_yaml, validate


def read_overrides(path: Path) -> dict:
    """The dotted keys and values of an overrides file, or ParamsError (one line)."""
    try:
        overrides = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ParamsError(f"{path}: cannot read it ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(overrides, dict) or not overrides:
        raise ParamsError(f"{path}: must map dotted params.yaml keys to values, e.g. train.epochs: 5")
    return overrides


def apply(params: dict, overrides: dict, source: str) -> dict:
    """``params`` with ``overrides`` set, validated as a whole (ParamsError names ``source``)."""
    merged = copy.deepcopy(params)
    for key, value in overrides.items():
        *sections, last = str(key).split(".")
        node = merged
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node or isinstance(node[last], dict) \
                or isinstance(value, dict):
            raise ParamsError(f"{source}: {key} is not a params.yaml key with a single value")
        node[last] = value
    try:
        return validate(merged, make_process)
    except ParamsError as error:
        raise ParamsError(f"{source} on params.yaml: {str(error).removeprefix('params.yaml: ')}") from None


def set_flags(overrides: dict) -> list[str]:
    """``-S key=value`` arguments of ``dvc exp run``; values in compact JSON (YAML reads it back)."""
    flags = []
    for key, value in overrides.items():
        flags += ["-S", f"{key}={json.dumps(value, separators=(',', ':'))}"]
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.quick", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", type=Path, default=Path("quick.yaml"))
    parser.add_argument("--dry", action="store_true", help="print the dvc command, run nothing")
    args = parser.parse_args()
    try:
        overrides = read_overrides(args.file)
        apply(read_yaml(Path(PARAMS_FILE)), overrides, str(args.file))
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    name = f"{args.file.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = ["dvc", "exp", "run", "-n", name, *set_flags(overrides)]
    print(" ".join(command), flush=True)
    if not args.dry:
        raise SystemExit(run_quietly(command))


# `dvc exp run` checks out every stage's outputs before it runs the stages; in a fresh clone
# there is no dvc.lock, so none has a hash yet and DVC warns once per output ("No file hash
# info found for 'models/ddpm'. It won't be created."), though nothing is wrong.
NO_HASH_YET = re.compile(r"^WARNING: No file hash info found for '.*'\. It won't be created\.$")


def run_quietly(command: list[str]) -> int:
    """Run ``command`` with its stdout as is and its stderr without the no-hash-yet warnings."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1)
    for line in process.stderr:
        if not NO_HASH_YET.match(line.rstrip("\n")):
            sys.stderr.write(line)
            sys.stderr.flush()
    return process.wait()


if __name__ == "__main__":
    main()
