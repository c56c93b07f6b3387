"""Evaluating trained models: scores of samples against real digits, the one-step x0 estimate,
the FID-against-steps sweep, and the forward and reverse trajectories the figures show.

Sample quality is measured on the features of the MNIST classifier (``diffusion.classifier``)
with the metrics of ``diffusion.metrics``, always against a ``Reference``: a set of real test
digits, and as many real training digits scored the same way (the floor, what a perfect model
would get with this sample count, since FID depends on it).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from diffusion.classifier import MnistClassifier, embed
from diffusion.data import to_model_range
from diffusion.metrics import (CONDITIONAL_ACCURACY, HEADLINE_SCORES, SCORES, conditional_accuracy,
                               nearest_neighbours, psnr, quality_metrics)
from diffusion.model import DiffusionModel
from diffusion.process import NoiseProcess, timesteps_at
from diffusion.sampling import sample, steps_within
from diffusion.training import heldout_loss


@dataclass
class Reference:
    """Classifier features of real test digits, and the floor: the scores of as many real
    training digits against them."""

    classifier: MnistClassifier
    features: np.ndarray
    probabilities: np.ndarray
    floor: dict[str, float]
    seed: int
    batch_size: int = 1000

    @classmethod
    def of(cls, classifier: MnistClassifier, test_images: torch.Tensor,
           train_images: torch.Tensor, *, seed: int, batch_size: int = 1000) -> Reference:
        """``test_images`` and ``train_images`` are uint8 (N, 28, 28), as many of each."""
        features, probabilities = embed(classifier, test_images, batch_size)
        reference = cls(classifier, features, probabilities, {}, seed, batch_size)
        reference.floor = reference.score(train_images)
        return reference

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """FID, KID, Inception Score, precision/recall and class balance of uint8 ``images``
        against the test digits (``diffusion.metrics.quality_metrics``), and for images asked
        for digits ``labels``, the conditional accuracy."""
        features, probabilities = embed(self.classifier, images, self.batch_size)
        scores = quality_metrics(features, probabilities, self.features, self.probabilities,
                                 seed=self.seed)
        if labels is not None:
            scores[CONDITIONAL_ACCURACY] = conditional_accuracy(probabilities, labels.cpu().numpy())
        return scores


@torch.no_grad()
def x0_psnr(model: DiffusionModel, images: torch.Tensor, t: int, *, seed: int,
            batch_size: int = 1000) -> float:
    """Mean PSNR (dB) of the one-step estimate x0_hat(x_t) (Ho et al. eq. 15) against the clean
    uint8 ``images``, with x_t drawn from the model's own forward process at timestep ``t``."""
    generator = torch.Generator(model.device).manual_seed(seed)
    scores = []
    for start in range(0, images.shape[0], batch_size):
        x0 = to_model_range(images[start:start + batch_size].to(model.device), model.scale)
        t_batch = torch.full((x0.shape[0],), t, device=model.device)
        x_t, _ = model.process.corrupt(x0, t_batch, generator=generator)
        x0_hat = model.denoise(x_t, t_batch).clamp(-model.scale, model.scale)
        scores.append(psnr(x0_hat, x0, data_range=2 * model.scale))
    return torch.cat(scores).mean().item()


def evaluate_model(model: DiffusionModel, samples: torch.Tensor, reference: Reference,
                   test_images: torch.Tensor, *, psnr_fractions: Iterable[float], seed: int,
                   batch_size: int = 1000, labels: torch.Tensor | None = None) -> dict:
    """The evaluate stage's metrics of one model: ``heldout_loss`` (Ho eq. 14, noise fixed by
    ``seed``) and ``psnr_t<t>`` on ``test_images``, at t = round(f n_T) for each fraction f
    (at least 1), and ``quality`` of the uint8 ``samples`` (asked for digits ``labels``, if
    conditional) with the ``floor`` beside it. A conditional model's held-out loss is that of
    its unconditional prediction (the test digits' labels are not used)."""
    test_images = test_images.to(model.device)
    metrics: dict = {
        "n_samples": int(samples.shape[0]),
        "heldout_loss": heldout_loss(model.net, model.process, test_images, seed=seed,
                                     batch_size=batch_size, precision=model.precision,
                                     scale=model.scale),
    }
    for t in timesteps_at(psnr_fractions, model.process.n_T, lowest=1):
        metrics[f"psnr_t{t}"] = x0_psnr(model, test_images, t, seed=seed, batch_size=batch_size)
    metrics["quality"] = reference.score(samples, labels)
    metrics["floor"] = reference.floor
    return metrics


def split_headline(metrics: dict) -> tuple[dict, dict]:
    """``evaluate_model``'s metrics as (headline, detail): the held-out loss and the
    HEADLINE_SCORES of the samples and of the floor, and everything else (kid_std, class
    fractions, PSNR per t), both keeping its layout."""
    headline: dict = {"n_samples": metrics["n_samples"], "heldout_loss": metrics["heldout_loss"]}
    detail: dict = {k: v for k, v in metrics.items() if k.startswith("psnr_t")}
    kept = (*HEADLINE_SCORES, CONDITIONAL_ACCURACY)
    for group in ("quality", "floor"):
        headline[group] = {k: v for k, v in metrics[group].items() if k in kept}
        detail[group] = {k: v for k, v in metrics[group].items() if k not in kept}
    return headline, detail


SweepTable = dict[str, dict[str, dict[str, float]]]  # column -> str(steps) -> scores


@dataclass
class PartialCell:
    """A sweep cell cut off between two batches: the images drawn so far (uint8, a whole
    number of batches), the state of the generator after them and their sampling seconds;
    enough to finish the cell as if it had never stopped."""

    column: str
    steps: int
    images: torch.Tensor
    generator_state: torch.Tensor
    seconds: float


def column(model: str, sampler: str, guidance: float = 0.0) -> str:
    """The sweep table's name of one row of the paper's table, e.g. ``ddgm_ddim``, and with
    classifier-free guidance w > 0 ``ddgm_w2_ddim`` (also the CSV column and the MLflow metric
    ``fid_<column>``)."""
    return f"{model}_w{guidance:g}_{sampler}" if guidance else f"{model}_{sampler}"


def sweep(models: dict[str, DiffusionModel], reference: Reference, *, steps: Iterable[int],
          samplers: Iterable[str], n: int, eta: float, clip_x0: bool, seed: int,
          batch_size: int, keep: Iterable[str] = SCORES, prior: str = "exact",
          guidance: Iterable[float] = (0.0,),
          on_cell: Callable[[str, int, dict[str, float]], None] | None = None,
          done: SweepTable | None = None, partial: PartialCell | None = None,
          on_batch: Callable[[PartialCell], None] | None = None) -> SweepTable:
    """FID (and the ``keep`` scores) against sampling steps: the DDGM paper's table.

    For every sampler (outer, as in the paper), model, guidance weight and step count, ``n``
    images from the same seed are scored against ``reference``; a step count above a model's
    n_T runs all n_T steps (stored under that count). A conditional model is asked for the
    digits in turn (equal numbers) with each classifier-free ``guidance`` weight w, and its
    cells add the conditional accuracy; an unconditional one takes only w = 0. Each cell holds
    the scores and the sampling ``seconds``; ``on_cell(column, steps, cell)`` sees each as it
    is done. Cells found in ``done`` (a resumed sweep's, same layout as the result) are taken
    as they are, not sampled again: every cell starts from ``seed``, so the others come out
    the same either way. Within a cell the images are drawn a batch at a time from one
    generator; ``on_batch`` sees the cell so far after every batch but the last, and a
    ``partial`` cell of a resumed sweep goes on from where it stopped, to the same images.
    """
    keep, done = tuple(keep), done or {}
    for model in models.values():  # warm-up (CUDA context, kernel choice): not timed below
        model.sample(min(n, batch_size), steps=1, seed=seed, batch_size=batch_size)
    table: SweepTable = {}
    for sampler in samplers:
        for name, model in models.items():
            digits = list(range(model.classes)) or None
            labels = model.labels(digits, n)
            for w in guidance:
                row = column(name, sampler, w)
                cells = table[row] = {}
                earlier = done.get(row, {})
                for count in sorted({steps_within(s, model.process.n_T) for s in steps}):
                    if str(count) in earlier:
                        cells[str(count)] = earlier[str(count)]
                        continue
                    images, seconds = draw_cell(
                        model, row, count, n, batch_size, seed, labels, partial, on_batch,
                        sampler=sampler, eta=eta, clip_x0=clip_x0, prior=prior, guidance=w)
                    scores = reference.score(images, labels)
                    kept = (*keep, CONDITIONAL_ACCURACY) if digits else keep
                    cell = {**{k: scores[k] for k in kept}, "seconds": seconds}
                    cells[str(count)] = cell
                    if on_cell is not None:
                        on_cell(row, count, cell)
    return table


def draw_cell(model: DiffusionModel, column: str, steps: int, n: int, batch_size: int, seed: int,
              labels: torch.Tensor | None, partial: PartialCell | None,
              on_batch: Callable[[PartialCell], None] | None,
              **sampling) -> tuple[torch.Tensor, float]:
    """One sweep cell's ``n`` uint8 images and their sampling seconds: ``model.sample`` of
    ``n`` from ``seed`` in batches of ``batch_size``, drawn one batch per call (the same
    images, ``DiffusionModel.sample``), from ``partial`` on if it is this cell's (see
    ``sweep``)."""
    generator = torch.Generator(model.device).manual_seed(seed)
    parts, seconds = [], 0.0
    if partial is not None and (partial.column, partial.steps) == (column, steps):
        parts, seconds = [partial.images], partial.seconds
        generator.set_state(partial.generator_state)
    for start in range(sum(len(p) for p in parts), n, batch_size):
        size = min(batch_size, n - start)
        digits = None if labels is None else labels[start:start + size].tolist()
        started = time.perf_counter()
        parts.append(model.sample(size, steps=steps, generator=generator, digit=digits,
                                  **sampling))
        seconds += time.perf_counter() - started
        if on_batch is not None and start + size < n:
            on_batch(PartialCell(column, steps, torch.cat(parts), generator.get_state(), seconds))
    return torch.cat(parts), seconds


def nearest_training_images(classifier: MnistClassifier, sets: dict[str, torch.Tensor],
                            train_images: torch.Tensor, k: int = 3
                            ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each set of uint8 images, the (distances, indices) of each image's ``k`` nearest
    training images in the classifier's feature space: the memorisation check (a sample much
    closer to the training set than unseen real digits are would be a copy)."""
    train_features = embed(classifier, train_images)[0]
    return {name: nearest_neighbours(embed(classifier, images)[0], train_features, k)
            for name, images in sets.items()}


def degradation(processes: dict[str, NoiseProcess], x0: torch.Tensor | dict[str, torch.Tensor],
                timesteps: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """x_t ~ q(x_t | x0) (Ho et al. eq. 4) for each process at its ``timesteps``: float
    (n_digits, len, 28, 28) each. Every process starts from the same digits ``x0`` (model range,
    on the CPU; one tensor per process where their data scales differ) and a generator seeded
    with ``seed``; t = 0 is x0."""
    rows = {}
    for name, process in processes.items():
        start = x0[name] if isinstance(x0, dict) else x0
        if process.device.type != "cpu":  # a copy: the caller's process stays where it is
            process = copy.deepcopy(process).cpu()
        generator = torch.Generator().manual_seed(seed)
        frames = []
        for t in timesteps[name]:
            t_batch = torch.full((start.shape[0],), t, dtype=torch.long)
            frames.append(process.corrupt(start, t_batch, generator=generator)[0][:, 0])
        rows[name] = torch.stack(frames, dim=1)
    return rows


def reverse_trajectory(model: DiffusionModel, n: int, points: int,
                       seed: int) -> tuple[list[int], torch.Tensor]:
    """x_t of ``n`` ancestral samples (Ho et al. Algorithm 2) at ``points`` evenly spaced t from
    n_T down to 0: the timesteps and float (n, len(timesteps), 28, 28).

    The random stream is that of ``model.sample(n, seed=seed)``, so the t = 0 frame is that
    call's output before rounding.
    """
    n_T = model.process.n_T
    wanted = sorted({round(t) for t in np.linspace(0, n_T, points)}, reverse=True)
    generator = torch.Generator(model.device).manual_seed(seed)
    x_T = model.process.prior((n, 1, 28, 28), generator=generator)
    frames = {n_T: x_T}

    def record(t: int, x: torch.Tensor) -> None:
        if t in wanted:
            frames[t] = x.clone()

    sample(model.net, model.process, n, device=model.device, generator=generator, x_T=x_T,
           callback=record, precision=model.precision)
    return wanted, torch.stack([frames[t][:, 0].float().cpu() for t in wanted], dim=1)
