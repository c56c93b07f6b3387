"""What the fault suites share: scratch repos with tiny params, stage runs as the real CLIs,
resume and signal helpers, and the uninterrupted reference run every resumed one must match."""

from __future__ import annotations

import csv
import hashlib
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from diffusion.io import load_torch
from tests.helpers import make_scratch_repo, merge, stage_env

# On top of helpers.TINY_PARAMS (256 images, n_T 10, a grid every epoch): three epochs.
FAULT_PARAMS = {"train": {"epochs": 3}}
LOSS_COLUMNS = ("epoch", "train_loss", "heldout_loss")


# ---------------------------------------------------------------- helpers
def scratch(path: Path, params: dict | None = None, **kwargs) -> Path:
    return make_scratch_repo(path, params=merge(FAULT_PARAMS, params or {}), git=False, **kwargs)


def env_for(root: Path, **extra: str) -> dict[str, str]:
    env = stage_env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    env.update(extra)
    return env


def stage_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{args[0]}", *args[1:]]


def run_stage(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(stage_cmd(*args), cwd=root, env=env or env_for(root),
                          capture_output=True, text=True, timeout=600)


def set_param(root: Path, dotted: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    node = params
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def error_lines(stderr: str) -> list[str]:
    """The stage's own messages: MLflow may add INFO lines when it creates a new store."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def resume_files(root: Path) -> list[Path]:
    return sorted((root / ".resume").glob("*.pt"))


def loss_rows(root: Path, model: str = "ddgm") -> list[tuple[str, ...]]:
    with open(root / "results/train" / model / "log.csv", newline="") as file:
        return [tuple(row[c] for c in LOSS_COLUMNS) for row in csv.DictReader(file)]


def assert_same_model(path: Path, reference: Path) -> None:
    """Equal tensors (EMA and raw weights) and, as torch.save is byte-reproducible here, bytes."""
    got, want = load_torch(path), load_torch(reference)
    for weights in ("ema", "net"):
        assert got[weights].keys() == want[weights].keys()
        for name, tensor in want[weights].items():
            assert torch.equal(got[weights][name], tensor), f"{weights}.{name} differs"
    assert got["config"] == want["config"]
    assert path.read_bytes() == reference.read_bytes()


# Run in the stage's process: after the first resume state is saved, say so in a file and wait,
# so that the signal lands between epochs 1 and 2 however slowly the test itself is scheduled.
# Ctrl-C is handled as on a terminal even where the tests run as a background job, whose
# children inherit SIGINT ignored.
PAUSE_AFTER_FIRST_SAVE = """
import pathlib, signal, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from diffusion.training import Checkpoint
original_save = Checkpoint.save
def save_then_pause(self, state, **extra):
    original_save(self, state, **extra)
    marker = pathlib.Path('saved-once')
    if not marker.exists():
        marker.touch()
        time.sleep(300)
Checkpoint.save = save_then_pause
"""


def stage_with(patch: str, stage: str, *args: str) -> list[str]:
    """The command of ``python -m stages.<stage> <args>`` run after the Python lines ``patch``."""
    argv = [f"stages.{stage}", *args]
    return [sys.executable, "-c", f"import runpy, sys\n{patch}\nsys.argv = {argv!r}\n"
            f"runpy.run_module('stages.{stage}', run_name='__main__')\n"]


def start_and_signal_after_epoch_1(root: Path, sig: int) -> tuple[subprocess.CompletedProcess, Path]:
    """Start train@ddgm, send ``sig`` once the resume state of epoch 1 is saved."""
    proc = subprocess.Popen(stage_with(PAUSE_AFTER_FIRST_SAVE, "train", "ddgm"), cwd=root,
                            env=env_for(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while not (root / "saved-once").exists():
        assert proc.poll() is None, f"train ended before its first checkpoint:\n{proc.communicate()}"
        assert time.monotonic() < deadline, "no resume state after 300 s"
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    (root / "saved-once").unlink()
    [checkpoint] = resume_files(root)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), checkpoint


def run_main(monkeypatch, root: Path, module: str, *argv: str) -> None:
    """Run ``stages.<module>.main()`` in this process, from ``root``, with its own MLflow store."""
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", [f"stages.{module}", *argv])
    for key in [k for k in os.environ if k.startswith(("DVC_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    importlib.import_module(f"stages.{module}").main()


def tree(root: Path) -> dict[str, str]:
    """Digest of every file the stages may write (all but the code and params.yaml)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] not in ("diffusion", "pipeline", "stages") and rel.name != "params.yaml":
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted train@ddgm run: what every resumed run must reproduce exactly."""
    root = scratch(tmp_path_factory.mktemp("reference"))
    result = run_stage(root, "train", "ddgm")
    assert result.returncode == 0, result.stderr
    assert not resume_files(root), "the resume state must be removed once training finishes"
    return root


