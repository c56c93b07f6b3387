"""The public API: ``diffusion.load`` -> sample / denoise / corrupt, and the MLflow PyTorch model.

Tiny untrained networks: the tests check shapes, types, reproducibility and the round trips
(model file -> DiffusionModel, DiffusionModel -> MLflow -> a fresh interpreter), not quality.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import diffusion
from diffusion.process import GammaProcess, GaussianProcess

REPO = Path(__file__).resolve().parents[1]
NET = {"hidden": [8, 8], "activation": "gelu"}
N_T = 20


def write_model(path: Path, process) -> Path:
    torch.manual_seed(0)
    net = diffusion.DenoiserCNN(tuple(NET["hidden"]), NET["activation"])
    ema = diffusion.DenoiserCNN(tuple(NET["hidden"]), NET["activation"])  # other weights
    diffusion.save_model(path, net, ema, process, {"model": "tiny", "net": NET})
    return path


@pytest.fixture(params=["ddpm", "ddgm"])
def model_file(request, tmp_path: Path) -> Path:
    process = (GaussianProcess((1e-4, 0.02), N_T) if request.param == "ddpm"
               else GammaProcess((1e-4, 0.02), N_T, 0.001))
    return write_model(tmp_path / request.param / "model.pt", process)


def test_import_is_light():
    code = "import sys, diffusion; print(sorted(m for m in ('mlflow', 'dvc') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    for name in diffusion.__all__:
        assert getattr(diffusion, name).__doc__, name


@pytest.mark.parametrize("sampler, eta", [("ancestral", 1.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_sample(model_file: Path, sampler: str, eta: float):
    model = diffusion.load(model_file, device="cpu")
    assert isinstance(model, diffusion.DiffusionModel) and isinstance(model, torch.nn.Module)
    assert model.config["process"]["n_T"] == N_T
    images = model.sample(6, steps=5, sampler=sampler, eta=eta, seed=0)
    assert images.shape == (6, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images, model.sample(6, steps=5, sampler=sampler, eta=eta, seed=0))
    assert not torch.equal(images, model.sample(6, steps=5, sampler=sampler, eta=eta, seed=1))
    assert model.sample(3, steps=5, sampler=sampler, eta=eta, seed=0, batch_size=2).shape == (3, 28, 28)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_batches_drawn_one_call_at_a_time_from_one_generator_are_the_whole_draw(
        model_file: Path, sampler: str):
    model = diffusion.load(model_file, device="cpu")
    whole = model.sample(7, steps=5, sampler=sampler, eta=1.0, seed=3, batch_size=3)
    generator = torch.Generator().manual_seed(3)
    parts = [model.sample(size, steps=5, sampler=sampler, eta=1.0, seed=99, generator=generator)
             for size in (3, 3, 1)]  # seed is not used when a generator is given
    assert torch.equal(torch.cat(parts), whole)
    generator.manual_seed(3)  # seeded again, it starts the draw again
    assert torch.equal(model.sample(3, steps=5, sampler=sampler, generator=generator), whole[:3])


def test_ema_and_raw_weights_differ(model_file: Path):
    ema = diffusion.load(model_file, device="cpu")
    raw = diffusion.load(model_file, device="cpu", weights="net")
    x = torch.zeros(2, 1, 28, 28)
    assert not torch.equal(ema(x, 5), raw(x, 5))
    with pytest.raises(ValueError, match="weights"):
        diffusion.load(model_file, weights="best")


def test_corrupt_and_denoise(model_file: Path):
    model = diffusion.load(model_file, device="cpu")
    digits = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    x0 = digits.unsqueeze(1).float() / 127.5 - 1.0

    assert torch.equal(model.corrupt(digits, 0), x0)  # t = 0 is the clean image
    x_t = model.corrupt(digits, 10, seed=0)
    assert x_t.shape == (4, 1, 28, 28) and x_t.dtype == torch.float32
    assert torch.equal(x_t, model.corrupt(x0, 10, seed=0))  # uint8 and model range agree
    assert not torch.equal(x_t, model.corrupt(x0, 10, seed=1))
    # per-image timesteps
    t = torch.tensor([1, 5, 10, N_T])
    assert model.corrupt(x0, t, seed=0).shape == (4, 1, 28, 28)

    x0_hat = model.denoise(x_t, 10)
    assert x0_hat.shape == (4, 1, 28, 28) and x0_hat.dtype == torch.float32
    assert model(x_t, 10).shape == (4, 1, 28, 28)  # the noise estimate
    # At t = 1, x_t is within sqrt(1 - alpha_bar_1) = 0.01 std of x0 and x0_hat divides the
    # network's (untrained, O(1)) noise estimate by sqrt(alpha_bar_1 / beta_1) ~ 100.
    x_1 = model.corrupt(x0, 1, seed=0)
    assert (x_1 - x0).abs().max() < 0.1
    assert (model.denoise(x_1, 1) - x0).abs().mean() < 0.1
    with pytest.raises(ValueError, match="timestep"):
        model.denoise(x_t, N_T + 1)
    with pytest.raises(ValueError, match="timestep"):
        model.corrupt(x0, -1)


def test_pickles_whole_and_the_process_moves_with_the_model(model_file: Path, tmp_path: Path):
    model = diffusion.load(model_file, device="cpu")
    assert model.process.device == model.device  # the schedules are buffers of the module
    torch.save(model, tmp_path / "whole.pt")
    copy = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert torch.equal(copy.sample(4, steps=5, seed=3), model.sample(4, steps=5, seed=3))
    assert {name for name, _ in copy.named_buffers()} >= {"process.alpha_bar", "process.beta"}


LOAD_IN_FRESH_INTERPRETER = textwrap.dedent("""
    import json, sys
    import mlflow.pytorch
    model = mlflow.pytorch.load_model(sys.argv[1])
    import diffusion
    images = {s: model.sample(8, steps=10, sampler=s, eta=0.0, seed=7).tolist()
              for s in ("ancestral", "ddim")}
    print(json.dumps({"class": type(model).__name__, "module": type(model).__module__,
                      "diffusion_from": diffusion.__file__, "images": images}))
""")


@pytest.mark.slow  # loads in a fresh interpreter
def test_mlflow_pytorch_round_trip(tmp_path: Path, monkeypatch):
    """The train stage's MLflow model loads in a fresh interpreter and samples identically."""
    from pipeline.tracking import Run

    process = GammaProcess((1e-4, 0.02), N_T, 0.001)
    model_file = write_model(tmp_path / "models" / "ddgm" / "model.pt", process)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # the experiment's artifacts go to tmp_path
    run = Run("train@ddgm", "ddgm")
    run.log_artifact(model_file, "model_file")
    run.log_pytorch_model(diffusion.load(model_file, device="cpu"), model_file, "ddgm")
    run.finish()
    assert not run._warned, "logging the model failed"

    original = diffusion.load(model_file, device="cpu")
    expected = {s: original.sample(8, steps=10, sampler=s, eta=0.0, seed=7)
                for s in ("ancestral", "ddim")}
    # A fresh interpreter in an empty folder, without the repo on its path: the classes come
    # from the code logged with the model.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DVC_ROOT")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    scratch = tmp_path / "elsewhere"
    scratch.mkdir()
    for model_uri in (f"runs:/{run.run_id}/ddgm", "models:/ddgm/1"):  # the run's, the registry's
        result = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_INTERPRETER, model_uri],
                                cwd=scratch, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        loaded = json.loads(result.stdout.strip().splitlines()[-1])
        assert loaded["class"] == "DiffusionModel" and loaded["module"] == "diffusion.model"
        assert not loaded["diffusion_from"].startswith(str(REPO))
        for sampler, images in expected.items():
            assert torch.equal(torch.tensor(loaded["images"][sampler], dtype=torch.uint8), images)

    # The weights-only copy beside it: diffusion.load_from_mlflow by run id, by run URI and from
    # the model registry, where each train run adds a version of the model named after it.
    for reference in (run.run_id, f"runs:/{run.run_id}/ddgm", "models:/ddgm/1", "models:/ddgm/latest",
                      "models:/ddgm@newest"):
        again = diffusion.load_from_mlflow(reference, device="cpu", tracking_uri=uri)
        assert torch.equal(again.sample(8, steps=10, sampler="ddim", eta=0.0, seed=7),
                           expected["ddim"])
    # The raw model file stays a plain run artifact.
    assert [a.path for a in run.client.list_artifacts(run.run_id, "model_file")] == ["model_file/model.pt"]


def test_log_pytorch_model_failure_does_not_raise(tmp_path: Path, monkeypatch, capsys):
    from pipeline.tracking import Run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    run = Run("train@ddpm", "ddpm")
    model = diffusion.load(write_model(tmp_path / "model.pt", GaussianProcess((1e-4, 0.02), N_T)),
                           device="cpu")
    run.log_pytorch_model(model, tmp_path / "missing" / "model.pt", "ddpm")  # warns, goes on
    assert run._warned
    assert "MLflow logging failed" in capsys.readouterr().err
    run.finish()


def test_load_from_mlflow_rejects_a_folder_without_the_model_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="extra_files/model.pt"):
        diffusion.load_from_mlflow(str(tmp_path))
