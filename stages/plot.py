"""DVC stage plot: figures that compare DDPM and DDGM, drawn from the pipeline's own outputs.

Writes seven PNGs to ``results/plot/`` and logs them to MLflow:

- ``loss_curves.png``: train and held-out loss per epoch (``results/train/<model>/log.csv``).
- ``samples.png``: the first 64 sampled digits of each model (``results/sample/<model>``).
- ``degradation.png``: ``plot.n_digits`` test digits under each model's forward process
  q(x_t | x0) (Ho et al. 2020, eq. 4) at t = round(f * n_T) for the fractions f of ``plot.t_show``:
  Gaussian noise for DDPM, Gamma noise for DDGM, with the schedules stored in the model files.
- ``trajectories.png``: x_t along ancestral sampling (Ho et al. 2020, Algorithm 2) of a few
  digits per model, from t = n_T down to 0.
- ``class_balance.png``: the fraction of each model's samples per predicted digit, beside the
  real training images' (``results/evaluate/<model>/metrics.json``, quality and floor).
- ``precision_recall.png``: precision and recall (Kynkäänniemi et al. 2019) of each model and of
  real training images, against the test set (same files).
- ``memorisation.png``: a few samples of each model beside their nearest training images in the
  feature space of the stage ``classifier``'s network, with the median nearest-training distance
  of ``MEMORISATION_CHECK`` samples and of as many held-out test digits: samples much closer to
  the training set than unseen real digits are would be copies of it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # drawn with Agg, no GUI backend or pyplot state

from diffusion.classifier import embed, load_classifier
from diffusion.data import grid_image, to_model_range
from diffusion.io import atomic_path
from diffusion.metrics import nearest_neighbours
from diffusion.mnist import load_mnist
from diffusion.model import DiffusionModel, load
from diffusion.process import NoiseProcess
from diffusion.sampling import sample
from stages.common import (MODELS, RAW_DIR, fail, load_or_exit, mnist_reference, plain,
                           samples_or_exit, stage_main)
from stages.params import load_params_or_exit
from stages.tracking import Run, TrackingUnavailableError

OUT_DIR = Path("results/plot")
LABELS = {"ddpm": "DDPM (Gaussian)", "ddgm": "DDGM (Gamma)"}
COLORS = {"ddpm": "tab:blue", "ddgm": "tab:orange"}
GRID_IMAGES, TRAJECTORIES, TRAJECTORY_POINTS, DPI = 64, 4, 8, 120
MEMORISATION_ROWS, NEIGHBOURS, MEMORISATION_CHECK = 4, 3, 1000
REAL_LABEL, REAL_COLOR = "real training images", "tab:gray"
CLIPPED = dict(cmap="gray", vmin=-1.0, vmax=1.0)  # model range [-1, 1]; values outside are clipped


def degradation_rows(processes: dict[str, NoiseProcess], x0: torch.Tensor,
                     timesteps: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """x_t ~ q(x_t | x0) for each process at its ``timesteps``: float (n_digits, len, 28, 28) each.

    Every process starts from the same x0 and a generator seeded with ``seed``; t = 0 is x0.
    """
    rows = {}
    for name, process in processes.items():
        generator = torch.Generator().manual_seed(seed)
        frames = []
        for t in timesteps[name]:
            t_batch = torch.full((x0.shape[0],), t, dtype=torch.long)
            eps = process.noise(t_batch, x0.shape, generator=generator)
            frames.append(process.q_sample(x0, t_batch, eps)[:, 0])
        rows[name] = torch.stack(frames, dim=1)
    return rows


def reverse_trajectory(model: DiffusionModel, n: int, points: int,
                       seed: int) -> tuple[list[int], torch.Tensor]:
    """x_t of ``n`` ancestral samples at ``points`` evenly spaced t from n_T down to 0.

    Returns the timesteps and float (n, len(timesteps), 28, 28). The random stream is that of
    ``model.sample(n, seed=seed)``, so the t = 0 frame is that call's output before rounding.
    """
    n_T = model.process.n_T
    wanted = sorted({round(t) for t in np.linspace(0, n_T, points)}, reverse=True)
    generator = torch.Generator(model.device).manual_seed(seed)
    x_T = model.process.prior((n, 1, 28, 28), device=model.device, generator=generator)
    frames = {n_T: x_T}

    def record(t: int, x: torch.Tensor) -> None:
        if t in wanted:
            frames[t] = x.clone()

    sample(model.net, model.process, n, device=model.device, generator=generator, x_T=x_T,
           callback=record, precision=model.precision)
    return wanted, torch.stack([frames[t][:, 0].float().cpu() for t in wanted], dim=1)


def same_or_both(timesteps: Iterable[list[int]]) -> list[str]:
    """Column titles for frames of several models: "t = 50", or "t = 50 | 5" if their n_T differ."""
    return [f"t = {' | '.join(dict.fromkeys(map(str, ts)))}" for ts in zip(*timesteps)]


def read_log(path: Path) -> dict[str, np.ndarray]:
    """The columns epoch, train_loss, heldout_loss of a training log as arrays."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    columns = ("epoch", "train_loss", "heldout_loss")
    if not rows or any(c not in rows[0] for c in columns):
        fail(f"{path}: expected a header with {', '.join(columns)} and at least one row")
    return {c: np.array([float(r[c]) for r in rows]) for c in columns}


def save_figure(fig: Figure, name: str) -> None:
    with atomic_path(OUT_DIR / name) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def plot_losses(logs: dict[str, dict[str, np.ndarray]]) -> None:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    for name, log in logs.items():
        marker = "o" if len(log["epoch"]) <= 20 else None
        ax.plot(log["epoch"], log["train_loss"], color=COLORS[name], marker=marker,
                label=f"{LABELS[name]}: train")
        ax.plot(log["epoch"], log["heldout_loss"], color=COLORS[name], marker=marker, ls="--",
                label=f"{LABELS[name]}: held-out")
    ax.set(title="Denoising loss (MSE of the predicted noise)", xlabel="epoch", ylabel="loss")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, "loss_curves.png")


def plot_samples(samples: dict[str, np.ndarray]) -> None:
    fig = Figure(figsize=(4.2 * len(samples), 4.5), layout="constrained")
    axes = fig.subplots(1, len(samples))
    for ax, (name, images) in zip(axes, samples.items()):
        shown = torch.from_numpy(images[:GRID_IMAGES])
        ax.imshow(grid_image(shown).numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{name.upper()}: first {len(shown)} of {len(images)} samples")
        ax.axis("off")
    save_figure(fig, "samples.png")


def plot_frames(rows: list[tuple[str, torch.Tensor]], columns: list[str], title: str,
                name: str) -> None:
    """One row per (label, frames) and one column per frame, pixels clipped to [-1, 1]."""
    fig = Figure(figsize=(1.0 * len(columns) + 1.4, 1.0 * len(rows) + 0.5), layout="constrained")
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, (label, frames) in enumerate(rows):
        for c, column in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(frames[c].numpy(), **CLIPPED)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(column, fontsize=9)
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, name)


def read_metrics(path: Path) -> dict:
    """An evaluate stage's metrics.json, checked for what the quality figures draw."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        fail(f"{path}: cannot read the evaluate stage's metrics ({error})")
    wanted = ["precision", "recall", "class_tv", "n_samples"] + [f"class_fraction_{d}" for d in range(10)]
    for group in ("quality", "floor"):
        missing = [key for key in wanted if key not in metrics.get(group, {})]
        if missing:
            fail(f"{path}: '{group}' lacks {', '.join(missing)}; re-run the evaluate stage")
    return metrics


def grouped_bars(ax, groups: list[str], series: list[tuple[str, str, list[float]]],
                 annotate: bool = False) -> None:
    """One cluster of bars per group, one bar per (label, colour, values) series."""
    width = 0.8 / len(series)
    for i, (label, color, values) in enumerate(series):
        positions = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(positions, values, width, label=label, color=color)
        if annotate:
            ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(np.arange(len(groups)), groups)


def quality_series(metrics: dict[str, dict], keys: list[str],
                   label: str = "") -> list[tuple[str, str, list[float]]]:
    """Bar series of ``keys`` for each model's samples, then for the real training images.

    The real row is the evaluate stage's floor: the same metrics for as many training images
    against the test set (equal for both models, which share ``evaluate.n_samples`` and seed).
    """
    def suffix(values: dict) -> str:
        return label.format(**values) if label else ""

    series = [(LABELS[name] + suffix(m["quality"]), COLORS[name], [m["quality"][k] for k in keys])
              for name, m in metrics.items()]
    floor = next(iter(metrics.values()))["floor"]
    series.append((REAL_LABEL + suffix(floor), REAL_COLOR, [floor[k] for k in keys]))
    return series


def plot_class_balance(metrics: dict[str, dict]) -> None:
    fig = Figure(figsize=(7.4, 4.2), layout="constrained")
    ax = fig.subplots()
    grouped_bars(ax, [str(d) for d in range(10)],
                 quality_series(metrics, [f"class_fraction_{d}" for d in range(10)],
                                " (TV to test set {class_tv:.3f})"))
    ax.axhline(0.1, color="black", lw=0.8, ls=":", label="uniform (0.1)")
    n = next(iter(metrics.values()))["quality"]["n_samples"]
    ax.set(title=f"Predicted digit of {n} images per set (stage classifier)",
           xlabel="predicted digit", ylabel="fraction of images")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, "class_balance.png")


def plot_precision_recall(metrics: dict[str, dict]) -> None:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    grouped_bars(ax, ["precision", "recall"], quality_series(metrics, ["precision", "recall"]),
                 annotate=True)
    n = next(iter(metrics.values()))["quality"]["n_samples"]
    ax.set(title=f"Precision and recall against the test set, k = 3, {n} images per set",
           ylabel="fraction", ylim=(0, 1.12))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    save_figure(fig, "precision_recall.png")


def plot_memorisation(samples: dict[str, np.ndarray], train_images: np.ndarray,
                      neighbours: dict[str, tuple[np.ndarray, np.ndarray]], held_out: str) -> None:
    """Rows of [sample | its nearest training images], the feature distance under each."""
    rows = [(name, i) for name in samples for i in range(MEMORISATION_ROWS)]
    fig = Figure(figsize=(1.1 * (NEIGHBOURS + 1) + 1.6, 1.15 * len(rows) + 1.2), layout="constrained")
    axes = fig.subplots(len(rows), NEIGHBOURS + 1, squeeze=False)
    for r, (name, i) in enumerate(rows):
        distances, indices = neighbours[name]
        images = [samples[name][i]] + [train_images[j] for j in indices[i]]
        for c, image in enumerate(images):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([]), ax.set_yticks([])
            if c:
                ax.set_xlabel(f"d = {distances[i, c - 1]:.2f}", fontsize=7, labelpad=1)
            if r == 0:
                ax.set_title("sample" if c == 0 else f"nearest {c}", fontsize=9)
        axes[r, 0].set_ylabel(f"{name.upper()} {i + 1}", fontsize=8, rotation=0, ha="right", va="center")
    medians = ", ".join(f"{name.upper()} {np.median(neighbours[name][0][:, 0]):.2f}" for name in samples)
    fig.suptitle("Samples beside their nearest training images (classifier features)\n"
                 f"median nearest distance: {medians}; {held_out}", fontsize=9)
    save_figure(fig, "memorisation.png")


@stage_main
def main() -> None:
    params = load_params_or_exit("plot")
    seed, n_digits = params["seed"], params["plot"]["n_digits"]
    models = {name: load_or_exit(load, Path("models") / name / "model.pt",
                                 precision=params["precision"]) for name in MODELS}
    classifier = load_or_exit(load_classifier, Path("models/classifier/classifier.pt"),
                              next(iter(models.values())).device)
    # Each model's timesteps of the fractions plot.t_show (repeats kept: columns line up).
    t_show = {name: [round(f * model.process.n_T) for f in params["plot"]["t_show"]]
              for name, model in models.items()}
    digits = load_mnist(RAW_DIR, train=False)[0][:n_digits]
    logs = {name: read_log(Path("results/train") / name / "log.csv") for name in MODELS}
    samples = {name: np.asarray(samples_or_exit(Path("results/sample") / name / "samples.npy")) for name in MODELS}
    metrics = {name: read_metrics(Path("results/evaluate") / name / "metrics.json") for name in MODELS}
    too_few = {name: len(images) for name, images in samples.items() if len(images) < MEMORISATION_ROWS}
    if too_few:
        fail(f"the memorisation panel shows {MEMORISATION_ROWS} samples per model, but "
             f"results/sample holds {too_few}: raise sample.n_samples", status=2)
    try:
        run = Run("plot")
    except TrackingUnavailableError as error:
        fail(str(error))
    run.log_params(plain({"seed": seed, "plot": params["plot"], "precision": params["precision"]}))

    plot_losses(logs)
    plot_samples(samples)
    degraded = degradation_rows({name: m.process for name, m in models.items()},
                                to_model_range(digits), t_show, seed)
    plot_frames([(f"digit {i + 1}\n{LABELS[name]}", degraded[name][i])
                 for i in range(len(digits)) for name in MODELS], same_or_both(t_show.values()),
                f"Forward process q(x_t | x0), same digits and seed {seed} "
                "(pixels clipped to [-1, 1])", "degradation.png")
    rows, steps = [], []
    for name, model in models.items():
        timesteps, frames = reverse_trajectory(model, TRAJECTORIES, TRAJECTORY_POINTS, seed)
        steps.append(timesteps)
        rows += [(f"{LABELS[name]}\nsample {i + 1}", frames[i]) for i in range(TRAJECTORIES)]
    plot_frames(rows, same_or_both(steps), f"Ancestral sampling from t = n_T to 0, seed {seed} "
                "(pixels clipped to [-1, 1])", "trajectories.png")

    plot_class_balance(metrics)
    plot_precision_recall(metrics)
    train_images = load_mnist(RAW_DIR, train=True)[0]
    checked = {name: torch.from_numpy(images[:MEMORISATION_CHECK]) for name, images in samples.items()}
    n_held_out = min(MEMORISATION_CHECK, max(len(images) for images in checked.values()))
    checked["held-out"] = mnist_reference(torch.device("cpu"), train=False, n=n_held_out, seed=seed)
    features = {name: embed(classifier, images)[0] for name, images in checked.items()}
    train_features = embed(classifier, train_images)[0]
    neighbours = {name: nearest_neighbours(feats, train_features, NEIGHBOURS)
                  for name, feats in features.items()}
    held_out = neighbours.pop("held-out")[0][:, 0]
    plot_memorisation(samples, train_images.numpy(), neighbours,
                      f"{len(held_out)} held-out test digits {np.median(held_out):.2f}")

    run.log_artifacts(OUT_DIR)
    run.finish()
    print(f"plot: {', '.join(sorted(p.name for p in OUT_DIR.glob('*.png')))} -> {OUT_DIR}")


if __name__ == "__main__":
    main()
