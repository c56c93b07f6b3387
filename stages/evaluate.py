"""DVC stage evaluate@<model>: score a trained model on the MNIST test set.

Writes ``results/evaluate/<model>/metrics.json`` with, for ``evaluate.n_samples`` test images
(a random subset fixed by ``seed`` when fewer than all 10000) and the first as many samples:
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

from diffusion.classifier import embed, load_classifier
from diffusion.data import to_model_range
from diffusion.io import save_json
from diffusion.metrics import psnr, quality_metrics
from diffusion.model import DiffusionModel, load
from diffusion.network import resolve_precision
from diffusion.process import timesteps_at
from diffusion.training import heldout_loss
from stages.common import (fail, load_or_exit, mnist_reference, model_argument, parent_run_id,
                           plain, samples_or_exit, stage_main)
from stages.params import load_params_or_exit
from stages.tracking import Run, TrackingUnavailableError


@torch.no_grad()
def psnr_at(model: DiffusionModel, images: torch.Tensor, t: int, *, seed: int,
            batch_size: int) -> float:
    """Mean PSNR of the one-step x0 estimate from x_t, over uint8 ``images`` on the device."""
    generator = torch.Generator(model.device).manual_seed(seed)
    scores = []
    for start in range(0, images.shape[0], batch_size):
        x0 = to_model_range(images[start:start + batch_size])
        t_batch = torch.full((x0.shape[0],), t, device=model.device)
        eps = model.process.noise(t_batch, x0.shape, device=model.device, generator=generator)
        x0_hat = model.denoise(model.process.q_sample(x0, t_batch, eps), t_batch)
        scores.append(psnr(x0_hat.clamp(-1, 1), x0))
    return torch.cat(scores).mean().item()


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
    device = model.device
    precision = resolve_precision(model.precision, device)
    classifier = load_or_exit(load_classifier, Path("models/classifier/classifier.pt"), device)
    parent = parent_run_id(models_dir)
    try:
        run = Run(stage, model_name, parent_run_id=parent)
    except TrackingUnavailableError as error:
        fail(str(error))
    run.log_params({"seed": seed, "evaluate": settings, "precision": params["precision"],
                    "precision_resolved": precision})

    test_images = mnist_reference(device, train=False, n=n, seed=seed)
    train_images = mnist_reference(device, train=True, n=n, seed=seed)
    fake = torch.from_numpy(np.array(samples[:n])).to(device)

    metrics: dict = {
        "n_samples": n,
        "heldout_loss": heldout_loss(model.net, model.process, test_images, seed=seed,
                                     batch_size=batch_size, precision=precision),
    }
    for t in timesteps_at(settings["psnr_t"], model.process.n_T, lowest=1):
        metrics[f"psnr_t{t}"] = psnr_at(model, test_images, t, seed=seed, batch_size=batch_size)
    test_feats, test_probs = embed(classifier, test_images, batch_size)
    fake_feats, fake_probs = embed(classifier, fake, batch_size)
    real_feats, real_probs = embed(classifier, train_images, batch_size)
    metrics["quality"] = quality_metrics(fake_feats, fake_probs, test_feats, test_probs, seed=seed)
    metrics["floor"] = quality_metrics(real_feats, real_probs, test_feats, test_probs, seed=seed)

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
