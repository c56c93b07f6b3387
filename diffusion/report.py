"""Figures and tables of results, drawn from the pipeline's outputs (matplotlib, no pyplot).

The plot stage's figures compare the models: loss curves, samples, forward degradation and
reverse trajectories (frames), class balance, precision/recall and the memorisation panel. The
sweep's are its FID-against-steps plot and its tables (CSV for ``dvc plots``, Markdown for
people). Each figure function returns a ``matplotlib.figure.Figure``; ``save_figure`` writes
it atomically. Models are named by their params.yaml name and labelled with their noise.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # drawn with Agg: no GUI backend, no pyplot state

from diffusion.data import grid_image
from diffusion.io import atomic_path
from diffusion.metrics import CONDITIONAL_ACCURACY

DPI = 120
NOISE_NAMES = {"gaussian": "Gaussian", "gamma": "Gamma"}
REAL_LABEL, REAL_COLOR = "real training images", "tab:gray"
CLIPPED = dict(cmap="gray", vmin=-1.0, vmax=1.0)  # model range [-1, 1]; values outside are clipped

Table = dict[str, dict[str, dict[str, float]]]  # column -> str(steps) -> metric -> value


def model_label(model: str, noise: str) -> str:
    """e.g. ``DDGM (Gamma)`` for the model ``ddgm`` with Gamma noise."""
    return f"{model.upper()} ({NOISE_NAMES.get(noise, noise)})"


def colours(models: Iterable[str]) -> dict[str, str]:
    """One matplotlib cycle colour per model, in order."""
    return {model: f"C{i}" for i, model in enumerate(models)}


def device_label(device: torch.device) -> str:
    """e.g. ``cuda:0 (NVIDIA H100)`` or ``cpu (2 threads)``: what a result was measured on."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def save_figure(figure: Figure, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)


# ------------------------------------------------------------------ the plot stage's figures
def loss_figure(logs: dict[str, dict[str, np.ndarray]], labels: dict[str, str]) -> Figure:
    """Train (solid) and held-out (dashed) loss per epoch of each model's training log."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    colour = colours(logs)
    for name, log in logs.items():
        marker = "o" if len(log["epoch"]) <= 20 else None
        ax.plot(log["epoch"], log["train_loss"], color=colour[name], marker=marker,
                label=f"{labels[name]}: train")
        ax.plot(log["epoch"], log["heldout_loss"], color=colour[name], marker=marker, ls="--",
                label=f"{labels[name]}: held-out")
    ax.set(title="Denoising loss (MSE of the predicted noise)", xlabel="epoch", ylabel="loss")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def samples_figure(samples: dict[str, np.ndarray], shown: int = 64) -> Figure:
    """The first ``shown`` uint8 samples of each model on a grid, side by side."""
    fig = Figure(figsize=(4.2 * len(samples), 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(samples)))
    for ax, (name, images) in zip(axes, samples.items()):
        first = torch.from_numpy(np.array(images[:shown]))  # a writable copy
        ax.imshow(grid_image(first).numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{name.upper()}: first {len(first)} of {len(images)} samples")
        ax.axis("off")
    return fig


def frames_figure(rows: list[tuple[str, torch.Tensor]], columns: list[str], title: str) -> Figure:
    """One row per (label, frames (len(columns), 28, 28) in model range), pixels clipped."""
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
    return fig


def degradation_figure(degraded: dict[str, torch.Tensor], labels: dict[str, str],
                       timesteps: dict[str, list[int]], seed: int) -> Figure:
    """``diffusion.evaluation.degradation`` rows: each digit under each model's forward process."""
    n_digits = next(iter(degraded.values())).shape[0]
    rows = [(f"digit {i + 1}\n{labels[m]}", degraded[m][i]) for i in range(n_digits) for m in degraded]
    return frames_figure(rows, timestep_titles(timesteps.values()),
                         f"Forward process q(x_t | x0), same digits and seed {seed} "
                         "(pixels clipped to [-1, 1])")


def trajectories_figure(trajectories: dict[str, tuple[list[int], torch.Tensor]],
                        labels: dict[str, str], seed: int) -> Figure:
    """``diffusion.evaluation.reverse_trajectory`` of each model: (timesteps, frames) per model."""
    rows = [(f"{labels[m]}\nsample {i + 1}", frames[i])
            for m, (_, frames) in trajectories.items() for i in range(frames.shape[0])]
    return frames_figure(rows, timestep_titles(t for t, _ in trajectories.values()),
                         f"Ancestral sampling from t = n_T to 0, seed {seed} "
                         "(pixels clipped to [-1, 1])")


def timestep_titles(timesteps: Iterable[list[int]]) -> list[str]:
    """Column titles for frames of several models: "t = 50", or "t = 50 | 5" if their n_T differ."""
    return [f"t = {' | '.join(dict.fromkeys(map(str, ts)))}" for ts in zip(*timesteps)]


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


def quality_series(metrics: dict[str, dict], keys: list[str], labels: dict[str, str],
                   suffix: str = "") -> list[tuple[str, str, list[float]]]:
    """Bar series of ``keys`` for each model's samples, then for the real training images.

    ``metrics`` are evaluate stage metrics.json contents; the real row is their floor (equal
    for all models, which share ``evaluate.n_samples`` and seed). ``suffix`` is formatted with
    each row's metrics and appended to its label.
    """
    colour = colours(metrics)
    series = [(labels[name] + suffix.format(**m["quality"]), colour[name],
               [m["quality"][k] for k in keys]) for name, m in metrics.items()]
    floor = next(iter(metrics.values()))["floor"]
    series.append((REAL_LABEL + suffix.format(**floor), REAL_COLOR, [floor[k] for k in keys]))
    return series


def class_balance_figure(metrics: dict[str, dict], labels: dict[str, str]) -> Figure:
    fig = Figure(figsize=(7.4, 4.2), layout="constrained")
    ax = fig.subplots()
    grouped_bars(ax, [str(d) for d in range(10)],
                 quality_series(metrics, [f"class_fraction_{d}" for d in range(10)], labels,
                                " (TV to test set {class_tv:.3f})"))
    ax.axhline(0.1, color="black", lw=0.8, ls=":", label="uniform (0.1)")
    n = next(iter(metrics.values()))["quality"]["n_samples"]
    ax.set(title=f"Predicted digit of {n} images per set (stage classifier)",
           xlabel="predicted digit", ylabel="fraction of images")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def precision_recall_figure(metrics: dict[str, dict], labels: dict[str, str]) -> Figure:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    grouped_bars(ax, ["precision", "recall"],
                 quality_series(metrics, ["precision", "recall"], labels), annotate=True)
    n = next(iter(metrics.values()))["quality"]["n_samples"]
    ax.set(title=f"Precision and recall against the test set, k = 3, {n} images per set",
           ylabel="fraction", ylim=(0, 1.12))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    return fig


def memorisation_figure(samples: dict[str, np.ndarray], train_images: np.ndarray,
                        neighbours: dict[str, tuple[np.ndarray, np.ndarray]], held_out: str,
                        rows_per_model: int = 4) -> Figure:
    """Rows of [sample | its nearest training images], the feature distance under each;
    ``neighbours[model]`` = (distances, indices) from ``diffusion.metrics.nearest_neighbours``."""
    k = next(iter(neighbours.values()))[1].shape[1]
    rows = [(name, i) for name in samples for i in range(rows_per_model)]
    fig = Figure(figsize=(1.1 * (k + 1) + 1.6, 1.15 * len(rows) + 1.2), layout="constrained")
    axes = fig.subplots(len(rows), k + 1, squeeze=False)
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
    return fig


# ------------------------------------------------------------------ the sweep's table and plot
def label(model: str, noise: str, sampler: str, eta: float, clip_x0: bool = False,
          guidance: float = 0.0) -> str:
    """Human-readable row name, e.g. ``Gamma (ddgm), DDIM eta=0`` (``, x0 clipped``,
    ``, guidance w=2``)."""
    how = "ancestral (DDPM)" if sampler == "ancestral" else f"DDIM eta={eta:g}"
    return (f"{NOISE_NAMES.get(noise, noise)} ({model}), {how}{', x0 clipped' if clip_x0 else ''}"
            f"{f', guidance w={guidance:g}' if guidance else ''}")


def fid_rows(table: Table, columns: list[str], steps: list[int]) -> list[dict[str, float | str]]:
    """One row per step count: ``steps`` and each column's FID ("" where the cell was skipped)."""
    return [{"steps": s, **{c: table.get(c, {}).get(str(s), {}).get("fid", "") for c in columns}}
            for s in steps]


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """``rows`` as CSV with the header ``steps,<columns>``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["steps", *columns], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def markdown_table(table: Table, rows: dict[str, str], steps: list[int], key: str = "fid",
                   digits: int = 2) -> str:
    """Markdown table of ``key``: one line per entry of ``rows`` (column -> label), one column
    per step count; skipped cells show an em dash."""
    def cell(c: str, s: int) -> str:
        value = table.get(c, {}).get(str(s), {}).get(key)
        return "—" if value is None else f"{value:.{digits}f}"

    lines = ["| | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    lines += [f"| {name} | " + " | ".join(cell(c, s) for s in steps) + " |"
              for c, name in rows.items()]
    return "\n".join(lines) + "\n"


def markdown_report(table: Table, rows: dict[str, str], steps: list[int], floor: dict[str, float],
                    n_samples: int, device: str) -> str:
    """``table.md``: the FID table, what it was measured on, the conditional accuracy (of
    conditional models) and the sampling times."""
    conditional = {c: name for c, name in rows.items()
                   if any(CONDITIONAL_ACCURACY in cell for cell in table.get(c, {}).values())}
    accuracy = (f"## Conditional accuracy\n\n"
                f"{markdown_table(table, conditional, steps, CONDITIONAL_ACCURACY, 3)}\n"
                "The fraction of the images the MNIST classifier reads as the digit asked for.\n\n"
                if conditional else "")
    return (f"# FID against sampling steps\n\n{markdown_table(table, rows, steps)}\n"
            f"FID of {n_samples} generated images against {n_samples} random MNIST test "
            f"images, on the MNIST classifier's features (lower is better).\n"
            f"Floor ({n_samples} random real training images against the same test images): "
            f"FID {floor['fid']:.2f}.\nDevice: {device}.\n\n{accuracy}"
            f"## Sampling seconds\n\n{markdown_table(table, rows, steps, 'seconds', 1)}")


def fid_figure(table: Table, rows: dict[str, str], steps: list[int], floor_fid: float,
               n_samples: int) -> Figure:
    """FID against steps on a log x axis, one line per row (colour = model, solid = ancestral,
    dash-dot = DDIM), the floor as a dashed black line; the y axis turns logarithmic when the
    FIDs span more than a factor 20."""
    from matplotlib.ticker import NullLocator, ScalarFormatter

    figure = Figure(figsize=(7, 4.5), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    colour = colours(dict.fromkeys(c.rsplit("_", 1)[0] for c in rows))
    values = [floor_fid]
    for c, name in rows.items():
        model, sampler = c.rsplit("_", 1)
        xs = [s for s in steps if str(s) in table.get(c, {})]
        ys = [table[c][str(s)]["fid"] for s in xs]
        values += ys
        axes.plot(xs, ys, color=colour[model], label=name,
                  marker="o" if sampler == "ancestral" else "s",
                  linestyle="-" if sampler == "ancestral" else "-.")
    axes.axhline(floor_fid, color="black", linestyle="--", linewidth=1,
                 label=f"floor: real train vs test images ({floor_fid:.2f})")
    axes.set_xscale("log")
    axes.set_xticks(steps, [str(s) for s in steps])
    axes.xaxis.set_minor_locator(NullLocator())
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 20:
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(ScalarFormatter())  # 10 and 100 rather than 10^1, 10^2
    axes.set_xlabel("sampling steps")
    axes.set_ylabel("FID (classifier features, lower is better)")
    axes.set_title(f"MNIST: FID against sampling steps ({n_samples} samples)")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize="small")
    return figure
