"""Tests of diffusion.classifier: input conversion, determinism, save/load, embedding, accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.classifier import (
    MnistClassifier,
    embed,
    evaluate_accuracy,
    load_classifier,
    prepare,
    save_classifier,
    train_classifier,
)
from diffusion.metrics import frechet_distance, inception_score
from diffusion.mnist import load_mnist

def random_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic uint8 images whose class is a bright band starting at row 2 * label + 4."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = torch.randint(0, 60, (n, 28, 28), generator=generator, dtype=torch.uint8)
    for index, label in enumerate(labels.tolist()):
        images[index, 2 * label + 4 : 2 * label + 7, 4:24] = 255
    return images, labels


def test_prepare_converts_uint8_and_keeps_float() -> None:
    u8 = torch.tensor([0, 255, 127], dtype=torch.uint8).repeat(1, 28, 10)[:, :, :28]
    converted = prepare(u8)
    assert converted.shape == (1, 1, 28, 28) and converted.dtype == torch.float32
    assert converted.min() == -1.0 and converted.max() == 1.0
    torch.testing.assert_close(converted, u8.float().unsqueeze(1) / 127.5 - 1)
    floats = torch.rand(3, 1, 28, 28) * 2 - 1
    assert torch.equal(prepare(floats), floats)
    assert prepare(floats[:, 0]).shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match="shape"):
        prepare(torch.zeros(2, 3, 28, 28))


def test_forward_and_features_shapes() -> None:
    model = MnistClassifier().eval()
    images, _ = random_digits(5, seed=0)
    assert model(images).shape == (5, 10)
    assert model.features(images).shape == (5, model.feature_dim)
    # uint8 input and its [-1, 1] float version give the same logits
    torch.testing.assert_close(model(images), model(images.float().unsqueeze(1) / 127.5 - 1))


def test_training_is_deterministic_and_learns() -> None:
    images, labels = random_digits(600, seed=1)
    settings = dict(epochs=2, batch_size=64, lr=1e-3, seed=7, device=torch.device("cpu"))
    reported: list[tuple[int, dict]] = []
    global_state = torch.get_rng_state()
    first = train_classifier(images, labels, report=lambda *epoch: reported.append(epoch), **settings)
    assert torch.equal(torch.get_rng_state(), global_state)  # caller's random state untouched
    second = train_classifier(images, labels, **settings)
    assert [epoch for epoch, _ in reported] == [1, 2]
    assert set(reported[-1][1]) == {"train_loss", "train_accuracy", "seconds"}
    assert not first.training
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    test_images, test_labels = random_digits(300, seed=2)
    assert evaluate_accuracy(first, test_images, test_labels, batch_size=128) > 0.9


def test_train_rejects_bad_inputs() -> None:
    images, labels = random_digits(10, seed=0)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="uint8"):
        train_classifier(images.float(), labels, epochs=1, batch_size=4, lr=1e-3, seed=0, device=cpu)
    with pytest.raises(ValueError, match="labels"):
        train_classifier(images, labels[:5], epochs=1, batch_size=4, lr=1e-3, seed=0, device=cpu)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MnistClassifier(channels=(8, 16), feature_dim=32).eval()
    images, _ = random_digits(7, seed=3)
    path = tmp_path / "models" / "classifier.pt"
    save_classifier(model, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["classifier.pt"]  # no temp file left
    payload = torch.load(path, weights_only=True)
    assert payload["config"] == {"channels": [8, 16], "feature_dim": 32, "dropout": 0.3}
    loaded = load_classifier(path, torch.device("cpu"))
    assert not loaded.training and loaded.feature_dim == 32
    torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


def test_embed_matches_model_and_batches() -> None:
    torch.manual_seed(0)
    model = MnistClassifier().eval()
    images, _ = random_digits(25, seed=4)
    features, probs = embed(model, images, batch_size=10)
    assert features.dtype == np.float64 and probs.dtype == np.float64
    assert features.shape == (25, model.feature_dim) and probs.shape == (25, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    with torch.no_grad():
        expected = model.features(images).double().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    features_one_batch, _ = embed(model, images, batch_size=1000)
    np.testing.assert_allclose(features, features_one_batch, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_and_embedding() -> None:
    images, labels = random_digits(256, seed=5)
    cuda = torch.device("cuda")
    model = train_classifier(images, labels, epochs=1, batch_size=64, lr=1e-3, seed=0, device=cuda)
    assert model.device.type == "cuda"
    features, probs = embed(model, images)
    assert features.shape == (256, model.feature_dim) and probs.shape == (256, 10)
    assert 0.0 <= evaluate_accuracy(model, images, labels) <= 1.0


@pytest.mark.slow  # trains the default classifier
def test_default_classifier_reaches_99_percent(
    trained_classifier: MnistClassifier, mnist_raw_dir: Path
) -> None:
    test_images, test_labels = load_mnist(mnist_raw_dir, train=False)
    assert evaluate_accuracy(trained_classifier, test_images, test_labels) >= 0.99


# ---------------- the metrics on the trained classifier's features ---------------------
# Here rather than in test_metrics.py: under `make test` a test file runs in one process, and
# the session's trained classifier is trained once per process.


@pytest.mark.slow  # uses the trained classifier
def test_fid_rises_monotonically_with_noise(trained_classifier: MnistClassifier, mnist_raw_dir: Path) -> None:
    train_images, _ = load_mnist(mnist_raw_dir, train=True)
    test_images, _ = load_mnist(mnist_raw_dir, train=False)
    reference_feats, _ = embed(trained_classifier, test_images[:2000])
    clean = train_images[:2000].float().unsqueeze(1) / 127.5 - 1
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    fids = []
    for sigma in (0.0, 0.15, 0.3, 0.6, 1.0):
        noisy = (clean + sigma * noise).clamp(-1, 1)
        fids.append(frechet_distance(embed(trained_classifier, noisy)[0], reference_feats))
    assert all(lower < higher for lower, higher in zip(fids, fids[1:])), fids


@pytest.mark.slow  # uses the trained classifier
def test_inception_score_of_real_test_set_is_high(
    trained_classifier: MnistClassifier, mnist_raw_dir: Path
) -> None:
    test_images, _ = load_mnist(mnist_raw_dir, train=False)
    _, probs = embed(trained_classifier, test_images)
    assert 9.0 < inception_score(probs) <= 10.0
