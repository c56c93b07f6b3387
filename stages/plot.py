"""DVC stage plot: figures that compare DDPM and DDGM, drawn from the pipeline's own outputs.

Writes four PNGs to ``results/plot/`` and logs them to MLflow:

- ``loss_curves.png``: train and held-out loss per epoch (``results/train/<model>/log.csv``).
- ``samples.png``: the first 64 sampled digits of each model (``results/sample/<model>``).
- ``degradation.png``: ``plot.n_digits`` test digits under each model's forward process
  q(x_t | x0) (Ho et al. 2020, eq. 4) at the timesteps ``plot.t_show``: Gaussian noise for DDPM,
  Gamma noise for DDGM, with the schedules stored in the model files.
- ``trajectories.png``: x_t along ancestral sampling (Ho et al. 2020, Algorithm 2) of a few
  digits per model, from t = n_T down to 0.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # drawn with Agg, no GUI backend or pyplot state

from diffusion.data import grid_image, to_model_range
from diffusion.io import UnsafeModelFileError, atomic_path
from diffusion.mnist import load_mnist
from diffusion.model import DiffusionModel, load
from diffusion.process import NoiseProcess
from diffusion.sampling import sample
from stages.common import MODELS, RAW_DIR, fail, plain
from stages.params import load_params_or_exit
from stages.tracking import Run, TrackingUnavailableError

OUT_DIR = Path("results/plot")
LABELS = {"ddpm": "DDPM (Gaussian)", "ddgm": "DDGM (Gamma)"}
COLORS = {"ddpm": "tab:blue", "ddgm": "tab:orange"}
GRID_IMAGES, TRAJECTORIES, TRAJECTORY_POINTS, DPI = 64, 4, 8, 120
CLIPPED = dict(cmap="gray", vmin=-1.0, vmax=1.0)  # model range [-1, 1]; values outside are clipped


def degradation_rows(processes: dict[str, NoiseProcess], x0: torch.Tensor, t_show: list[int],
                     seed: int) -> dict[str, torch.Tensor]:
    """x_t ~ q(x_t | x0) for each process and t: float (n_digits, len(t_show), 28, 28) each.

    Every process starts from the same x0 and a generator seeded with ``seed``; t = 0 is x0.
    """
    rows = {}
    for name, process in processes.items():
        generator = torch.Generator().manual_seed(seed)
        frames = []
        for t in t_show:
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
           callback=record)
    return wanted, torch.stack([frames[t][:, 0].float().cpu() for t in wanted], dim=1)


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


def load_samples(path: Path) -> np.ndarray:
    images = np.load(path)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        fail(f"{path}: expected uint8 images of shape (N, 28, 28), "
             f"got {images.dtype} {images.shape}")
    return images


def main() -> None:
    params = load_params_or_exit("plot")
    seed, n_digits, t_show = params["seed"], params["plot"]["n_digits"], params["plot"]["t_show"]
    try:
        models = {name: load(Path("models") / name / "model.pt") for name in MODELS}
    except UnsafeModelFileError as error:
        fail(str(error))
    for name, model in models.items():
        if max(t_show) > model.process.n_T:
            fail(f"plot.t_show has t = {max(t_show)}, more than n_T = {model.process.n_T} of "
                 f"models/{name}/model.pt: allowed are 0..n_T", status=2)
    digits = load_mnist(RAW_DIR, train=False)[0][:n_digits]
    logs = {name: read_log(Path("results/train") / name / "log.csv") for name in MODELS}
    samples = {name: load_samples(Path("results/sample") / name / "samples.npy") for name in MODELS}
    try:
        run = Run("plot")
    except TrackingUnavailableError as error:
        fail(str(error))
    run.log_params(plain({"seed": seed, "plot": params["plot"]}))

    plot_losses(logs)
    plot_samples(samples)
    degraded = degradation_rows({name: m.process for name, m in models.items()},
                                to_model_range(digits), t_show, seed)
    plot_frames([(f"digit {i + 1}\n{LABELS[name]}", degraded[name][i])
                 for i in range(len(digits)) for name in MODELS], [f"t = {t}" for t in t_show],
                f"Forward process q(x_t | x0), same digits and seed {seed} "
                "(pixels clipped to [-1, 1])", "degradation.png")
    rows, steps = [], []
    for name, model in models.items():
        timesteps, frames = reverse_trajectory(model, TRAJECTORIES, TRAJECTORY_POINTS, seed)
        steps.append(timesteps)
        rows += [(f"{LABELS[name]}\nsample {i + 1}", frames[i]) for i in range(TRAJECTORIES)]
    columns = [f"t = {' | '.join(dict.fromkeys(map(str, ts)))}"  # "t = a | b" if n_T differ
               for ts in zip(*steps)]
    plot_frames(rows, columns, f"Ancestral sampling from t = n_T to 0, seed {seed} "
                "(pixels clipped to [-1, 1])", "trajectories.png")

    run.log_artifacts(OUT_DIR)
    run.finish()
    print(f"plot: {', '.join(sorted(p.name for p in OUT_DIR.glob('*.png')))} -> {OUT_DIR}")


if __name__ == "__main__":
    main()
