"""DVC stage plot: figures that compare the models, drawn from the pipeline's own outputs.

Writes seven PNGs to ``results/plot/`` (drawn by ``diffusion.report``) and logs them to MLflow:
``loss_curves.png`` (``results/train/<model>/log.csv``), ``samples.png`` (the first 64 samples),
``degradation.png`` (``plot.n_digits`` test digits under each model's forward process at the
fractions ``plot.t_show`` of its n_T), ``trajectories.png`` (ancestral sampling from n_T to 0),
``class_balance.png`` and ``precision_recall.png`` (each model beside real training images,
from ``results/evaluate/<model>``), and ``memorisation.png`` (samples beside their nearest
training images in the classifier's feature space, among the ``data.train_subset`` images the
models learnt from, with the median nearest distance of ``MEMORISATION_CHECK`` samples and of as
many unseen test digits).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from diffusion.classifier import load_classifier
from diffusion.data import to_model_range
from diffusion.evaluation import degradation, nearest_training_images, reverse_trajectory
from diffusion.mnist import load_mnist
from diffusion.model import load
from diffusion.report import (class_balance_figure, degradation_figure, loss_figure,
                              memorisation_figure, model_label, precision_recall_figure,
                              samples_figure, save_figure, trajectories_figure)
from diffusion.metrics import CLASS_FRACTIONS
from pipeline.common import (fail, load_or_exit, mnist_on, mnist_reference, open_run,
                           samples_or_exit, stage_main)
from pipeline.params import load_params_or_exit
from pipeline.paths import (CLASSIFIER_FILE, PLOT_DIR, RAW_DIR, evaluate_dir, model_file,
                          samples_file, train_dir)

TRAJECTORIES, TRAJECTORY_POINTS = 4, 8
MEMORISATION_ROWS, NEIGHBOURS, MEMORISATION_CHECK = 4, 3, 1000
QUALITY_KEYS = ("precision", "recall", "class_tv", "n_samples", *CLASS_FRACTIONS)  # what it draws


def read_log(path: Path) -> dict[str, np.ndarray]:
    """The columns epoch, train_loss, heldout_loss of a training log as arrays."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    columns = ("epoch", "train_loss", "heldout_loss")
    if not rows or any(c not in rows[0] for c in columns):
        fail(f"{path}: expected a header with {', '.join(columns)} and at least one row")
    return {c: np.array([float(r[c]) for r in rows]) for c in columns}


def read_metrics(folder: Path) -> dict:
    """An evaluate stage's metrics.json and detail.json as one, checked for what the quality
    figures draw."""
    files = [folder / "metrics.json", folder / "detail.json"]
    try:
        metrics, detail = (json.loads(path.read_text()) for path in files)
    except (OSError, ValueError) as error:
        fail(f"{folder}: cannot read the evaluate stage's metrics ({error})")
    for group in ("quality", "floor"):
        metrics[group] = {**metrics.get(group, {}), **detail.get(group, {})}
        missing = [key for key in QUALITY_KEYS if key not in metrics[group]]
        if missing:
            fail(f"{files[0]}: '{group}' lacks {', '.join(missing)}; re-run the evaluate stage")
    return metrics


@stage_main
def main() -> None:
    params = load_params_or_exit("plot")
    seed, names, n_digits = params.seed, params.models, params.plot.n_digits
    models = {m: load_or_exit(load, model_file(m), precision=params.precision) for m in names}
    classifier = load_or_exit(load_classifier, CLASSIFIER_FILE, next(iter(models.values())).device)
    logs = {m: read_log(train_dir(m) / "log.csv") for m in names}
    # read into memory (the file is mapped read-only, which torch.from_numpy warns of)
    samples = {m: np.array(samples_or_exit(samples_file(m))) for m in names}
    metrics = {m: read_metrics(evaluate_dir(m)) for m in names}
    too_few = {m: len(images) for m, images in samples.items() if len(images) < MEMORISATION_ROWS}
    if too_few:
        fail(f"the memorisation panel shows {MEMORISATION_ROWS} samples per model, but "
             f"results/sample holds {too_few}: raise sample.n_samples", status=2)
    run = open_run("plot")
    run.log_params({"seed": seed, "models": names, "plot": params.plot.as_dict(),
                    "precision": params.precision, "train_subset": params.data.train_subset})
    labels = {m: model_label(m, model.process.name) for m, model in models.items()}

    save_figure(loss_figure(logs, labels), PLOT_DIR / "loss_curves.png")
    save_figure(samples_figure(samples), PLOT_DIR / "samples.png")
    # Each model's timesteps of the fractions plot.t_show (repeats kept: columns line up).
    t_show = {m: [round(f * model.process.n_T) for f in params.plot.t_show]
              for m, model in models.items()}
    digits = load_mnist(RAW_DIR, train=False)[0][:n_digits]
    degraded = degradation({m: model.process for m, model in models.items()},
                           {m: to_model_range(digits, model.scale) for m, model in models.items()},
                           t_show, seed)
    save_figure(degradation_figure(degraded, labels, t_show, seed), PLOT_DIR / "degradation.png")
    trajectories = {m: reverse_trajectory(model, TRAJECTORIES, TRAJECTORY_POINTS, seed)
                    for m, model in models.items()}
    save_figure(trajectories_figure(trajectories, labels, seed), PLOT_DIR / "trajectories.png")
    save_figure(class_balance_figure(metrics, labels), PLOT_DIR / "class_balance.png")
    save_figure(precision_recall_figure(metrics, labels), PLOT_DIR / "precision_recall.png")

    # the images the models learnt from (data.train_subset), as the train stage takes them
    train_images = mnist_on(torch.device("cpu"), train=True, subset=params.data.train_subset)[0]
    checked = {m: torch.from_numpy(images[:MEMORISATION_CHECK]) for m, images in samples.items()}
    n_held_out = min(MEMORISATION_CHECK, max(len(images) for images in checked.values()))
    checked["held-out"] = mnist_reference(torch.device("cpu"), train=False, n=n_held_out, seed=seed)
    neighbours = nearest_training_images(classifier, checked, train_images, NEIGHBOURS)
    held_out = neighbours.pop("held-out")[0][:, 0]
    save_figure(memorisation_figure(samples, train_images.numpy(), neighbours,
                                    f"{len(held_out)} held-out test digits {np.median(held_out):.2f}",
                                    MEMORISATION_ROWS), PLOT_DIR / "memorisation.png")

    run.log_artifacts(PLOT_DIR)
    run.finish()
    print(f"plot: {', '.join(sorted(p.name for p in PLOT_DIR.glob('*.png')))} -> {PLOT_DIR}")


if __name__ == "__main__":
    main()
