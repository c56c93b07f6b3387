"""Class-conditional models and classifier-free guidance (Ho and Salimans 2022): label dropping,
the guided prediction, sampling a requested digit, and the stages' conditional outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffusion.model import DiffusionModel
from diffusion.network import NO_LABEL, make_network
from diffusion.process import GammaProcess, GaussianProcess, guided, make_process
from diffusion.sampling import sample
from diffusion.training import drop_labels, make_state, train
from tests.helpers import make_scratch_repo, stage_env, train_config

UNET = {"kind": "unet", "channels": [8, 16], "blocks": 1, "attention": False, "activation": "silu"}
CNN = {"kind": "cnn", "hidden": [8, 8], "activation": "gelu"}


def processes(n_T: int = 50, target: str = "eps") -> list:
    return [GaussianProcess((1e-4, 0.2), n_T, target=target),
            GammaProcess((1e-4, 0.2), n_T, 1e-3, target=target)]


@pytest.mark.parametrize("probability", [0.1, 0.3])
def test_labels_are_dropped_at_the_given_rate_and_kept_otherwise(probability):
    labels = torch.randint(0, 10, (200_000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(labels, probability, torch.Generator().manual_seed(1))
    rate = (dropped == NO_LABEL).double().mean().item()
    assert abs(rate - probability) < 0.005  # 5 standard deviations at 200k draws
    kept = dropped != NO_LABEL
    assert torch.equal(dropped[kept], labels[kept])
    assert torch.equal(drop_labels(labels, 0.0), labels)


def test_guidance_zero_is_the_conditional_prediction_and_mixing_commutes_with_the_target():
    conditional, unconditional = torch.randn(2, 4, 1, 28, 28).unbind(0)
    assert torch.equal(guided(conditional, unconditional, 0.0), conditional)
    assert torch.allclose(guided(conditional, unconditional, 2.0), 3 * conditional - 2 * unconditional,
                          atol=1e-5)
    assert torch.equal(guided(conditional, conditional.clone(), 5.0), conditional)
    # Mixing x0 or v predictions, then converting once, gives the mix of the eps estimates.
    t = torch.tensor([3, 10, 25, 50])
    x_t = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    for target in ("x0", "v"):
        for process in processes(target=target):
            eps_c = process.eps_and_x0(x_t, t, conditional.double())[0]
            eps_u = process.eps_and_x0(x_t, t, unconditional.double())[0]
            eps_mixed = process.eps_and_x0(x_t, t, guided(conditional.double(),
                                                          unconditional.double(), 1.5))[0]
            assert torch.allclose(eps_mixed, guided(eps_c, eps_u, 1.5), atol=1e-9)


class ExactConditional(nn.Module):
    """The exact eps predictor for data whose digit c is the image means[c] plus Gaussian pixel
    noise of std ``sigma``: E[eps | x_t, c] = s (x_t - a m_c) / (a^2 sigma^2 + s^2) (Gaussian
    forward noise; with sigma = 0 the data is a point mass and this is exact for any noise law).
    ``NO_LABEL`` predicts for the mean of all digits, which a correct w = 0 sampler never uses."""

    def __init__(self, process, means: torch.Tensor, sigma: float) -> None:
        super().__init__()
        self.process, self.means, self.sigma = process, means, sigma
        self.calls_without_label = 0

    def forward(self, x, t, labels):
        steps = (t * self.process.n_T).round().long()
        alpha_bar = self.process.alpha_bar[steps].float().view(-1, 1, 1, 1)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        self.calls_without_label += int((labels == NO_LABEL).sum())
        means = torch.where((labels == NO_LABEL).view(-1, 1, 1, 1), self.means.mean(0),
                            self.means[labels.clamp(min=0)])
        return s * (x - a * means) / (a ** 2 * self.sigma ** 2 + s ** 2)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
@pytest.mark.parametrize("noise, sigma", [("gaussian", 0.3), ("gaussian", 0.0), ("gamma", 0.0)])
def test_exact_conditional_predictor_at_w0_reproduces_each_digit_mean(noise, sigma, sampler):
    process = processes()[noise == "gamma"]
    means = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    net = ExactConditional(process, means, sigma)
    n = 400
    labels = torch.arange(n) % 10
    x = sample(net, process, n, steps=25, sampler=sampler, eta=1.0, labels=labels, guidance=0.0,
               generator=torch.Generator().manual_seed(1), batch_size=150)
    assert net.calls_without_label == 0
    for digit in range(10):
        drawn = x[labels == digit]
        # The mean of 40 draws per pixel: its mean absolute error over the 784 pixels is
        # sigma sqrt(2 / pi) / sqrt(40) (0.038 for sigma = 0.3) when the mean is right.
        tolerance = 1.5 * sigma * (2 / np.pi) ** 0.5 / 40 ** 0.5 + 0.01
        assert (drawn.mean(0) - means[digit]).abs().mean() < tolerance, digit
    if not sigma:  # a point mass is reproduced image by image (start noise times sqrt(alpha_bar_T) aside)
        assert (x - means[labels]).abs().max() < 0.05


@pytest.mark.parametrize("config", [CNN, UNET], ids=["cnn", "unet"])
def test_a_conditional_network_starts_unconditional_and_an_unconditional_one_takes_no_labels(config):
    torch.manual_seed(0)
    net = make_network({**config, "classes": 10})
    x, t = torch.randn(3, 1, 28, 28), torch.rand(3)
    labels = torch.tensor([1, 7, NO_LABEL])
    assert net(x, t, labels).shape == (3, 1, 28, 28)
    assert torch.equal(net(x, t, labels), net(x, t))  # the label table starts at zero
    nn.init.normal_(net.label.table.weight)
    if config["kind"] == "unet":  # its output convolution starts at zero too
        nn.init.normal_(net.head[-1].weight, std=0.1)
    assert not torch.allclose(net(x, t, labels)[:2], net(x, t)[:2])
    assert torch.equal(net(x, t, labels)[2], net(x, t)[2])  # NO_LABEL is the unconditional row
    plain = make_network(config)
    assert not any("label" in key for key in plain.state_dict())  # old model files still load
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, labels)
    with pytest.raises(ValueError, match="classes = 3 is not allowed"):
        make_network({**config, "classes": 3})


def test_training_with_labels_teaches_the_label_table():
    """The digits reach the network: its label vectors leave zero; without labels they stay."""
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,), dtype=torch.uint8)
    config = train_config(epochs=1, batch_size=16, holdout_subset=16, lr=1e-3, label_drop=0.25)
    tables = {}
    for given in (labels, None):
        torch.manual_seed(0)
        state = make_state(make_network({**UNET, "classes": 10}), config, torch.device("cpu"))
        train(state, make_process({"noise": "gamma", "betas": [1e-4, 0.2], "n_T": 20, "theta_0": 1e-3}),
              images, images[:16], config, train_labels=given,
              test_labels=None if given is None else labels[:16])
        assert np.isfinite(state.log[-1].train_loss) and np.isfinite(state.log[-1].heldout_loss)
        tables[given is None] = state.net.label.table.weight.detach()
    assert tables[False][:10].abs().sum() > 0 and tables[False][10].abs().sum() > 0
    assert tables[True][:10].abs().sum() == 0  # no digit seen: only the NO_LABEL row trains


def conditional_model(noise: str = "gaussian") -> DiffusionModel:
    torch.manual_seed(0)
    net = make_network({**UNET, "classes": 10})
    nn.init.normal_(net.label.table.weight)
    nn.init.normal_(net.head[-1].weight, std=0.1)  # the U-Net's output starts at zero
    process = make_process({"noise": noise, "betas": [1e-4, 0.2], "n_T": 20, "theta_0": 1e-3})
    return DiffusionModel(net, process, precision="fp32").eval()


@pytest.mark.parametrize("noise", ["gaussian", "gamma"])
def test_model_samples_a_requested_digit_reproducibly(noise):
    model = conditional_model(noise)
    sevens = model.sample(20, digit=7, guidance=2.0, steps=5, seed=3)
    assert sevens.shape == (20, 28, 28) and sevens.dtype == torch.uint8
    assert torch.equal(sevens, model.sample(20, digit=7, guidance=2.0, steps=5, seed=3))
    assert not torch.equal(sevens, model.sample(20, digit=7, guidance=0.0, steps=5, seed=3))
    assert not torch.equal(sevens, model.sample(20, digit=1, guidance=2.0, steps=5, seed=3))
    assert model.labels([0, 1, 2], 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    x_t = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x_t, 10, digit=-1), model(x_t, 10))
    assert model(x_t, 10, digit=4, guidance=1.0).shape == x_t.shape


@pytest.mark.parametrize("kwargs, message", [
    ({"digit": 10}, "digit = 10 is not allowed: must be a digit 0..9"),
    ({"digit": [3, -1]}, "digit = [3, -1] is not allowed: must be a digit 0..9"),
    ({"digit": 7, "guidance": -1.0}, "guidance = -1.0 is not allowed: must be a number >= 0"),
    ({"guidance": 2.0}, "guidance = 2.0 needs a digit"),
])
def test_bad_digit_or_guidance_is_one_line(kwargs, message):
    with pytest.raises(ValueError) as error:
        conditional_model().sample(2, steps=2, **kwargs)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_an_unconditional_model_refuses_a_digit():
    model = DiffusionModel(make_network(CNN), make_process({"noise": "gaussian", "betas": [1e-4, 0.2],
                                                            "n_T": 20}))
    with pytest.raises(ValueError, match="this model is unconditional"):
        model.sample(2, digit=3)


@pytest.mark.slow
def test_conditional_pipeline_writes_labels_and_conditional_accuracy(tmp_path):
    """train, sample and evaluate of a conditional DDGM with guidance, through dvc repro (with
    no labels dropped in training, which the sample stage warns of)."""
    root = make_scratch_repo(tmp_path / "repo", {"net": {"classes": 10}, "train": {"label_drop": 0.0},
                                                 "sample": {"guidance": 1.0, "digits": [3, 5]}})
    done = subprocess.run(["dvc", "repro", "evaluate@ddgm"], cwd=root, env=stage_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    labels = np.load(root / "results/sample/ddgm/labels.npy")
    assert labels.tolist() == [3, 5] * 16
    with Image.open(root / "results/sample/ddgm/grid.png") as grid:  # a row of ten 3s, of ten 5s
        assert grid.size == (10 * 30 + 2, 2 * 30 + 2)
    metrics = json.loads((root / "results/evaluate/ddgm/metrics.json").read_text())
    assert 0.0 <= metrics["quality"]["conditional_accuracy"] <= 1.0
    assert "conditional accuracy" in done.stdout
    assert "models/ddgm/model.pt was trained with train.label_drop = 0" in done.stderr
    # The logged model takes the digit and the guidance weight as inference parameters.
    check = ("import mlflow, sys; info = mlflow.models.get_model_info('models:/ddgm/1'); "
             "print(sorted(p.name for p in info.signature.params))")
    shown = subprocess.run([sys.executable, "-c", check], cwd=root, env={
        **stage_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"},
        capture_output=True, text=True)
    assert shown.stdout.strip() == "['digit', 'guidance', 't']", shown.stderr[-2000:]


@pytest.mark.slow
def test_guidance_for_an_unconditional_model_is_one_line(tmp_path):
    root = make_scratch_repo(tmp_path / "repo", {"sample": {"guidance": 2.0}})
    done = subprocess.run(["dvc", "repro", "sample@ddpm"], cwd=root, env=stage_env(),
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert ("error: sample.guidance = 2.0 needs a conditional model, but models/ddpm/model.pt "
            "was trained with net.classes = 0") in done.stderr
