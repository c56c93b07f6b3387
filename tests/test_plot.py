"""The plot stage: seven PNGs from real (tiny) pipeline outputs, and the data behind them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffusion import report
from diffusion.classifier import MnistClassifier, save_classifier
from diffusion.data import to_uint8
from diffusion.evaluation import degradation, reverse_trajectory, split_headline
from diffusion.metrics import quality_metrics
from diffusion.model import load, save_model
from diffusion.network import DenoiserCNN
from diffusion.process import GammaProcess, GaussianProcess
from stages import plot
from tests.helpers import REPO, TINY_PARAMS, merge, write_synthetic_mnist

N_T = 10
FIGURES = ("loss_curves.png", "samples.png", "degradation.png", "trajectories.png",
           "class_balance.png", "precision_recall.png", "memorisation.png")


def fake_metrics(seed: int) -> dict:
    """An evaluate stage's metrics.json, from the real metric code on random features."""
    rng = np.random.default_rng(seed)

    def probs(n: int) -> np.ndarray:
        logits = rng.normal(size=(n, 10)) * 3
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    test_feats, test_probs = rng.normal(size=(40, 8)), probs(40)
    return {"n_samples": 40, "heldout_loss": 0.5,
            "quality": quality_metrics(rng.normal(0.5, 1, (40, 8)), probs(40), test_feats,
                                       test_probs, seed=0),
            "floor": quality_metrics(rng.normal(size=(40, 8)), probs(40), test_feats, test_probs,
                                     seed=0)}


def make_inputs(root, model_n_T: int = N_T) -> None:
    """What the plot stage reads: params, two untrained model files and an untrained
    classifier, logs, samples, metrics, MNIST."""
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_PARAMS)
    params["ddpm"]["n_T"] = params["ddgm"]["n_T"] = N_T
    params["plot"] = {"n_digits": 2, "t_show": [0, 0.5, 1]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_synthetic_mnist(root / "data/MNIST/raw", n_train=8, n_test=8)
    processes = {"ddpm": GaussianProcess((1e-4, 0.02), model_n_T),
                 "ddgm": GammaProcess((1e-4, 0.02), model_n_T, theta_0=0.001)}
    rng = np.random.default_rng(0)
    for name, process in processes.items():
        torch.manual_seed(0)
        net = DenoiserCNN((4, 4), "gelu")
        save_model(root / "models" / name / "model.pt", net, net, process,
                   {"model": name, "net": {"hidden": [4, 4], "activation": "gelu"}})
        log = root / "results/train" / name / "log.csv"
        log.parent.mkdir(parents=True)
        log.write_text("epoch,train_loss,heldout_loss,images_per_s,seconds\n"
                       "1,1.0,0.9,100,1.0\n2,0.8,0.85,100,1.0\n3,0.7,0.8,100,1.0\n")
        (root / "results/sample" / name).mkdir(parents=True)
        np.save(root / "results/sample" / name / "samples.npy",
                rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))
        (root / "results/evaluate" / name).mkdir(parents=True)
        headline, detail = split_headline(fake_metrics(seed=len(name) + (name == "ddgm")))
        (root / "results/evaluate" / name / "metrics.json").write_text(json.dumps(headline))
        (root / "results/evaluate" / name / "detail.json").write_text(json.dumps(detail))
    torch.manual_seed(0)
    save_classifier(MnistClassifier(), root / "models/classifier/classifier.pt")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_stage_writes_seven_legible_pngs_and_logs_them(workdir):
    make_inputs(workdir)
    plot.main()
    for name in FIGURES:
        path = workdir / "results/plot" / name
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
        assert 400 <= width <= 3000 and 300 <= height <= 3000, (name, image.size)
        assert path.stat().st_size > 5000, name  # drawn content, not an empty canvas
    assert not list((workdir / "results/plot").glob(".*"))  # no temporary files left behind
    import mlflow

    runs = mlflow.search_runs(experiment_names=["mnist-diffusion"], output_format="list")
    assert [r.data.tags["stage"] for r in runs] == ["plot"]
    assert runs[0].info.status == "FINISHED"
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert logged == set(FIGURES)


def test_t_show_follows_each_model_files_n_T(workdir):
    make_inputs(workdir, model_n_T=5)  # params say n_T = 10, the model files have 5
    plot.main()  # t_show holds fractions of n_T: t = 0, 2, 5 of the files' schedules
    assert (workdir / "results/plot/degradation.png").is_file()


def test_degradation_rows_start_clean_and_end_as_unit_variance_noise():
    processes = {"ddpm": GaussianProcess((1e-4, 0.02), 1000),
                 "ddgm": GammaProcess((1e-4, 0.02), 1000, theta_0=0.001)}
    x0 = torch.rand(16, 1, 28, 28) * 2 - 1
    t_show = {name: [0, 1, 1000] for name in processes}
    rows = degradation(processes, x0, t_show, seed=3)
    for name, process in processes.items():
        assert rows[name].shape == (16, 3, 28, 28)
        assert torch.equal(rows[name][:, 0], x0[:, 0])
        end = rows[name][:, 2]
        assert abs(end.mean()) < 0.05 and abs(end.std() - 1) < 0.05, name
        # The noise at t = 1, recovered from x_1 = sqrt(ab) x0 + sqrt(1 - ab) eps.
        ab = float(process.alpha_bar[1])
        eps = ((rows[name][:, 1] - ab ** 0.5 * x0[:, 0]) / (1 - ab) ** 0.5).double().flatten()
        skew = float(((eps - eps.mean()) ** 3).mean() / eps.std() ** 3)
        # Gamma(k_bar_1 = 100) noise has skewness 2 / sqrt(100) = 0.2; Gaussian noise has 0.
        assert (skew > 0.12) if name == "ddgm" else (abs(skew) < 0.08), (name, skew)
    again = degradation(processes, x0, t_show, seed=3)
    assert all(torch.equal(rows[n], again[n]) for n in processes)
    assert not torch.equal(rows["ddpm"][:, 1], rows["ddgm"][:, 1])


def test_reverse_trajectory_is_the_sampler_run_of_the_same_seed(workdir):
    make_inputs(workdir)
    model = load(workdir / "models/ddgm/model.pt", device="cpu")
    steps, frames = reverse_trajectory(model, n=3, points=4, seed=7)
    assert steps == [10, 7, 3, 0]
    assert frames.shape == (3, 4, 28, 28)
    assert torch.equal(to_uint8(frames[:, -1].unsqueeze(1)), model.sample(3, seed=7))


def test_quality_bars_are_each_models_metrics_then_the_real_floor():
    metrics = {"ddpm": fake_metrics(1), "ddgm": fake_metrics(2)}
    labels = {"ddpm": report.model_label("ddpm", "gaussian"), "ddgm": report.model_label("ddgm", "gamma")}
    series = report.quality_series(metrics, ["precision", "recall"], labels, " (TV {class_tv:.3f})")
    assert [label for label, _, _ in series] == [
        f"DDPM (Gaussian) (TV {metrics['ddpm']['quality']['class_tv']:.3f})",
        f"DDGM (Gamma) (TV {metrics['ddgm']['quality']['class_tv']:.3f})",
        f"real training images (TV {metrics['ddpm']['floor']['class_tv']:.3f})"]
    assert [values for _, _, values in series] == [
        [metrics["ddpm"]["quality"]["precision"], metrics["ddpm"]["quality"]["recall"]],
        [metrics["ddgm"]["quality"]["precision"], metrics["ddgm"]["quality"]["recall"]],
        [metrics["ddpm"]["floor"]["precision"], metrics["ddpm"]["floor"]["recall"]]]


def test_stage_refuses_metrics_without_the_quality_keys(workdir, capsys):
    make_inputs(workdir)
    path = workdir / "results/evaluate/ddgm/metrics.json"
    metrics = json.loads(path.read_text())
    del metrics["floor"]["recall"]
    path.write_text(json.dumps(metrics))
    with pytest.raises(SystemExit) as exit_info:
        plot.main()
    assert exit_info.value.code == 1
    assert "'floor' lacks recall; re-run the evaluate stage" in capsys.readouterr().err
    assert not (workdir / "results/plot").exists()


def plot_with_copies(root, monkeypatch, model: str, copies: dict[int, int]) -> dict:
    """Run the plot stage after making sample i of ``model`` a copy of training image j for each
    i: j of ``copies``; return what the memorisation panel was drawn from."""
    train_images = plot.load_mnist(root / "data/MNIST/raw", train=True)[0].numpy()
    samples_path = root / "results/sample" / model / "samples.npy"
    samples = np.load(samples_path)
    for sample, image in copies.items():
        samples[sample] = train_images[image]
    np.save(samples_path, samples)
    drawn = {}
    original = plot.memorisation_figure

    def capture(samples, train, neighbours, held_out, rows):
        drawn.update(train=train, neighbours=neighbours, held_out=held_out)
        return original(samples, train, neighbours, held_out, rows)

    monkeypatch.setattr(plot, "memorisation_figure", capture)
    plot.main()
    return drawn


def test_memorisation_panel_finds_a_copied_training_image(workdir, monkeypatch):
    make_inputs(workdir)
    drawn = plot_with_copies(workdir, monkeypatch, "ddgm", {1: 5})
    distances, indices = drawn["neighbours"]["ddgm"]
    assert distances.shape == indices.shape == (20, plot.NEIGHBOURS)
    assert indices[1, 0] == 5 and distances[1, 0] == 0
    assert distances[0, 0] > 0  # random pixels copy nothing
    assert drawn["held_out"].startswith("8 held-out test digits")  # all 8 synthetic test images


def test_memorisation_panel_searches_only_the_training_subset_the_models_saw(workdir, monkeypatch):
    make_inputs(workdir)
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["data"]["train_subset"] = 4  # the models learnt from training digits 0-3 only
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    drawn = plot_with_copies(workdir, monkeypatch, "ddpm", {0: 2, 1: 6})  # seen, and not seen
    distances, indices = drawn["neighbours"]["ddpm"]
    assert len(drawn["train"]) == 4 and indices.max() < 4
    assert indices[0, 0] == 2 and distances[0, 0] == 0
    assert distances[1, 0] > 0  # a copy of an image outside the subset is no copy of training data
