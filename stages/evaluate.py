"""DVC stage evaluate@<model>: score a trained model on the MNIST test set.

Writes ``results/evaluate/<model>/metrics.json`` (``diffusion.evaluation.evaluate_model``), for
``evaluate.n_samples`` test images (a random subset fixed by ``seed`` when fewer than all 10000)
and the first as many samples:
- ``heldout_loss``: the denoising loss (Ho eq. 14) on test images, noise fixed by ``seed``;
- ``psnr_t<t>``: PSNR (dB) of the one-step estimate x0_hat(x_t) against the clean test image, at
  t = round(f * n_T) for each fraction f of ``evaluate.psnr_t`` (at least t = 1);
- ``quality``: FID, KID, classifier Inception Score, precision/recall and class balance of the
  samples against the test set, on the features of the stage ``classifier``'s network;
- ``floor``: the same metrics for as many real training images against the test set, i.e. what
  a perfect model would score with this sample count (FID depends on it: it is recorded too).
The model runs in ``precision`` (the classifier in float32, so scores compare across machines).
The metrics go to an MLflow run nested under the model's training run, and onto that run too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffusion.classifier import load_classifier
from diffusion.evaluation import Reference, evaluate_model
from diffusion.io import save_json
from diffusion.model import load
from diffusion.network import resolve_precision
from stages.common import (fail, load_or_exit, mnist_reference, model_argument, open_run,
                           parent_run_id, plain, samples_or_exit, stage_main)
from stages.params import load_params_or_exit


@stage_main
def main() -> None:
    model_name = model_argument("evaluate")
    stage = f"evaluate@{model_name}"
    params = plain(load_params_or_exit(stage))
    settings, seed = params["evaluate"], params["seed"]
    n, batch_size = settings["n_samples"], settings["batch_size"]
    models_dir = Path("models") / model_name
    samples = samples_or_exit(Path("results/sample") / model_name / "samples.npy")
    if samples.shape[0] < n:
        fail(f"evaluate.n_samples = {n} but results/sample/{model_name} holds only "
             f"{samples.shape[0]} images: raise sample.n_samples or lower evaluate.n_samples",
             status=2)
    model = load_or_exit(load, models_dir / "model.pt", precision=params["precision"])
    precision = resolve_precision(model.precision, model.device)
    classifier = load_or_exit(load_classifier, Path("models/classifier/classifier.pt"), model.device)
    parent = parent_run_id(models_dir)
    run = open_run(stage, model_name, parent_run_id=parent)
    run.log_params({"seed": seed, "evaluate": settings, "precision": params["precision"],
                    "precision_resolved": precision})

    test_images = mnist_reference(model.device, train=False, n=n, seed=seed)
    reference = Reference.of(classifier, test_images,
                             mnist_reference(model.device, train=True, n=n, seed=seed),
                             seed=seed, batch_size=batch_size)
    fake = torch.from_numpy(np.array(samples[:n]))
    metrics = evaluate_model(model, fake, reference, test_images,
                             psnr_fractions=settings["psnr_t"], seed=seed, batch_size=batch_size)

    save_json(metrics, Path("results/evaluate") / model_name / "metrics.json")
    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for group in ("quality", "floor"):
        flat.update({f"{group}_{k}": v for k, v in metrics[group].items()})
    run.log_metrics(flat)
    if parent:
        run.log_metrics(flat, run_id=parent)  # also on the training run, beside its curves
    run.finish()
    print(f"{stage}: held-out loss {metrics['heldout_loss']:.4f}, FID {metrics['quality']['fid']:.2f} "
          f"(floor {metrics['floor']['fid']:.2f}) on {n} samples")


if __name__ == "__main__":
    main()
