"""Small MNIST classifier used as the feature extractor for sample-quality metrics.

The network is a LeNet-style CNN (LeCun et al., 1998, "Gradient-based learning applied
to document recognition"): two convolution + max-pool stages followed by a fully
connected layer whose activations (``MnistClassifier.features``) replace the Inception-v3
pool features of FID/KID (Heusel et al., 2017; Bińkowski et al., 2018), and whose logits
give the class probabilities used by the classifier Inception Score (Salimans et al., 2016)
and the class-balance metric.

Contents:
    prepare            uint8 (N, 28, 28) or float images -> float (N, 1, 28, 28) in [-1, 1]
    MnistClassifier    the CNN (``forward`` -> logits, ``features`` -> penultimate activations)
    train_classifier   deterministic Adam training on a resident tensor (no DataLoader)
    evaluate_accuracy  top-1 accuracy
    save_classifier / load_classifier   state dict + config, loaded with ``weights_only=True``
    embed              float64 features and class probabilities of a set of images
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusion.io import load_torch, save_torch

NUM_CLASSES = 10
IMAGE_SIZE = 28


def prepare(images: torch.Tensor) -> torch.Tensor:
    """Return images as float (N, 1, 28, 28) in [-1, 1], on the same device.

    Accepts uint8 (N, 28, 28) or (N, 1, 28, 28) in [0, 255], converted with the project
    convention ``u8 / 127.5 - 1``, or float images already in [-1, 1] with or without
    the channel axis.
    """
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"expected images of shape (N, 28, 28) or (N, 1, 28, 28), got {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise ValueError(f"expected uint8 or floating-point images, got dtype {images.dtype}")
    return images.float()


class MnistClassifier(nn.Module):
    """LeNet-style CNN: [conv3x3-BN-ReLU-maxpool] x 2 -> linear(feature_dim)-ReLU -> linear(10).

    Batch normalisation (and a cosine learning-rate decay in ``train_classifier``) make
    5 epochs of Adam enough for >= 99 % test accuracy while the network stays small
    enough to train on a CPU in well under a minute per epoch. Dropout acts only
    between the features and the head, so ``features`` is unaffected by it.
    """

    def __init__(
        self, channels: tuple[int, int] = (16, 32), feature_dim: int = 128, dropout: float = 0.3
    ) -> None:
        super().__init__()
        first, second = channels
        self.config = {
            "channels": [int(first), int(second)],
            "feature_dim": int(feature_dim),
            "dropout": float(dropout),
        }
        self.conv = nn.Sequential(
            nn.Conv2d(1, first, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(first),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(first, second, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(second),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14 -> 7
        )
        self.penultimate = nn.Sequential(
            nn.Flatten(),
            nn.Linear(second * 7 * 7, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, NUM_CLASSES))

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim) of images (uint8 or float in [-1, 1])."""
        return self.penultimate(self.conv(prepare(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10) of images (uint8 or float in [-1, 1])."""
        return self.head(self.features(x))


def _build_model(seed: int, config: dict | None = None) -> MnistClassifier:
    """Build the network on the CPU with weights drawn from ``seed``.

    The global CPU generator is forked so the caller's random state is left untouched and
    the initial weights do not depend on the target device.
    """
    config = config or {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MnistClassifier(
            channels=tuple(config.get("channels", (16, 32))),
            feature_dim=int(config.get("feature_dim", 128)),
            dropout=float(config.get("dropout", 0.3)),
        )


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    report: Callable[[int, dict[str, float]], None] | None = None,
) -> MnistClassifier:
    """Train a ``MnistClassifier`` with Adam and cross-entropy; return it in eval mode.

    ``images`` are uint8 (N, 28, 28), ``labels`` int64 (N,). The whole set stays resident
    on ``device`` as one uint8 tensor; every epoch draws a permutation from a
    ``torch.Generator`` seeded with ``seed`` and takes batches by indexing. The learning
    rate starts at ``lr`` and follows a cosine decay to 0 over all steps (Loshchilov &
    Hutter, 2017, SGDR, without restarts). Dropout draws from the global generator, which
    is forked and seeded with ``seed`` so training on the CPU is deterministic given the
    seed and the caller's random state is left unchanged. ``report(epoch, {"train_loss",
    "train_accuracy", "seconds"})`` sees each epoch's figures.
    """
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f"images must be uint8 (N, 28, 28), got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")

    device = torch.device(device)
    model = _build_model(seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-images.shape[0] // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    images = images.to(device)
    labels = labels.to(device=device, dtype=torch.long)
    shuffle_generator = torch.Generator().manual_seed(seed)
    forked_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked_devices):
        torch.manual_seed(seed)
        _train_epochs(model, optimizer, schedule, images, labels, shuffle_generator, epochs,
                      batch_size, report)
    return model.eval()


def _train_epochs(
    model: MnistClassifier,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    shuffle_generator: torch.Generator,
    epochs: int,
    batch_size: int,
    report: Callable[[int, dict[str, float]], None] | None,
) -> None:
    device, n = images.device, images.shape[0]
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(n, generator=shuffle_generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for first in range(0, n, batch_size):
            batch = order[first : first + batch_size]
            logits = model(images[batch])
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            # accumulated on the device to avoid a host sync per batch
            loss_sum += loss.detach() * batch.numel()
            correct += (logits.argmax(dim=1) == labels[batch]).sum()
        figures = {"train_loss": loss_sum.item() / n, "train_accuracy": correct.item() / n,
                   "seconds": time.perf_counter() - start}
        if report is not None:
            report(epoch, figures)


@torch.no_grad()
def evaluate_accuracy(
    model: MnistClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Top-1 accuracy of ``model`` on uint8 (N, 28, 28) images with int64 labels."""
    was_training = model.training
    model.eval()
    device = model.device
    correct = 0
    for first in range(0, images.shape[0], batch_size):
        batch = images[first : first + batch_size].to(device)
        predicted = model(batch).argmax(dim=1).cpu()
        correct += int((predicted == labels[first : first + batch_size].cpu()).sum())
    model.train(was_training)
    return correct / images.shape[0]


def save_classifier(model: MnistClassifier, path: str | os.PathLike) -> None:
    """Save ``{"config": ..., "state_dict": ...}`` atomically (diffusion.io.save_torch)."""
    save_torch({
        "config": dict(model.config),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
    }, path)


def load_classifier(path: str | os.PathLike, device: torch.device) -> MnistClassifier:
    """Load a classifier written by ``save_classifier`` onto ``device``, in eval mode.

    Through ``diffusion.io.load_torch``: only tensors and plain containers are unpickled.
    """
    payload = load_torch(path, map_location=torch.device(device), expect=("config", "state_dict"),
                         kind="classifier file of the classifier stage")
    model = _build_model(seed=0, config=payload["config"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval()


@torch.no_grad()
def embed(
    model: MnistClassifier, images: torch.Tensor, batch_size: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Return float64 numpy arrays ``(features (N, D), probabilities (N, 10))``.

    ``images`` are uint8 (N, 28, 28) or float in [-1, 1]; batches are moved to the
    model's device and evaluated in eval mode without gradients.
    """
    was_training = model.training
    model.eval()
    device = model.device
    feature_batches, prob_batches = [], []
    for first in range(0, images.shape[0], batch_size):
        batch = images[first : first + batch_size].to(device)
        features = model.features(batch)
        feature_batches.append(features.double().cpu())
        prob_batches.append(torch.softmax(model.head(features).double(), dim=1).cpu())
    model.train(was_training)
    if not feature_batches:
        return np.zeros((0, model.feature_dim)), np.zeros((0, NUM_CLASSES))
    return torch.cat(feature_batches).numpy(), torch.cat(prob_batches).numpy()
