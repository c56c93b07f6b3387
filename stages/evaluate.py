"""DVC stage evaluate@<model>: score a trained model on the MNIST test set.

Computes (``diffusion.evaluation.evaluate_model``), for ``evaluate.n_samples`` test images (a
random subset fixed by ``seed`` when fewer than all 10000) and the first as many samples:
- ``heldout_loss``: the denoising loss (Ho eq. 14) on test images, noise fixed by ``seed``;
- ``psnr_t<t>``: PSNR (dB) of the one-step estimate x0_hat(x_t) against the clean test image, at
  t = round(f * n_T) for each fraction f of ``evaluate.psnr_t`` (at least t = 1);
- ``quality``: FID, KID, classifier Inception Score, precision/recall and class balance of the
  samples against the test set, on the features of the stage ``classifier``'s network;
- ``floor``: the same metrics for as many real training images against the test set, i.e. what
  a perfect model would score with this sample count (FID depends on it: it is recorded too);
- ``conditional_accuracy`` (conditional models): the fraction of samples the classifier reads
  as the digit they were asked for (``results/sample/<model>/labels.npy``).
The model runs in ``precision`` (the classifier in float32, so scores compare across machines).

``results/evaluate/<model>/metrics.json`` (DVC metrics) holds the headline figures: the held-out
loss and FID, KID, IS, precision, recall and class TV of the samples and of the floor;
``detail.json`` the rest (PSNR per t, KID spread, class fractions). The headline figures are the
metrics of an MLflow run nested under the model's training run (never on the training run's
curves); the class balance and the PSNRs are tables of it.
"""

from __future__ import annotations

import numpy as np
import torch

from diffusion.classifier import load_classifier
from diffusion.evaluation import Reference, evaluate_model, split_headline
from diffusion.io import save_json
from diffusion.model import load
from diffusion.network import resolve_precision
from pipeline.common import (fail, load_or_exit, log_mnist, mnist_reference, model_argument,
                           mlflow_scores, open_run, samples_or_exit, stage_main)
from pipeline.params import load_params_or_exit
from pipeline.paths import (CLASSIFIER_FILE, evaluate_dir, labels_file, model_file, sample_dir,
                          samples_file)


@stage_main
def main() -> None:
    model_name = model_argument("evaluate")
    stage = f"evaluate@{model_name}"
    params = load_params_or_exit(stage)
    settings, seed = params.evaluate, params.seed
    n, batch_size = settings.n_samples, settings.batch_size
    samples = samples_or_exit(samples_file(model_name))
    if samples.shape[0] < n:
        fail(f"evaluate.n_samples = {n} but {sample_dir(model_name)} holds only "
             f"{samples.shape[0]} images: raise sample.n_samples or lower evaluate.n_samples",
             status=2)
    model = load_or_exit(load, model_file(model_name), precision=params.precision)
    precision = resolve_precision(model.precision, model.device)
    labels = None
    if model.classes:
        if not labels_file(model_name).is_file():
            fail(f"{labels_file(model_name)} is missing: the samples of a conditional model need "
                 f"their digits; re-create them with `dvc repro --force sample@{model_name}`")
        labels = torch.from_numpy(np.load(labels_file(model_name), allow_pickle=False)[:n])
    classifier = load_or_exit(load_classifier, CLASSIFIER_FILE, model.device)
    run = open_run(stage, model_name, parent_model_file=model_file(model_name))
    run.log_params({"seed": seed, "evaluate": settings.as_dict(), "precision": params.precision,
                    "precision_resolved": precision})

    test_images = mnist_reference(model.device, train=False, n=n, seed=seed)
    reference = Reference.of(classifier, test_images,
                             mnist_reference(model.device, train=True, n=n, seed=seed),
                             seed=seed, batch_size=batch_size)
    fake = torch.from_numpy(np.array(samples[:n]))
    with run.system_metrics():
        metrics = evaluate_model(model, fake, reference, test_images,
                                 psnr_fractions=settings.psnr_t, seed=seed,
                                 batch_size=batch_size, labels=labels)

    headline, detail = split_headline(metrics)
    out_dir = evaluate_dir(model_name)
    save_json(headline, out_dir / "metrics.json")
    save_json(detail, out_dir / "detail.json")
    log_mnist(run, train=False, used=n, context="evaluation", how="random")
    log_mnist(run, train=True, used=n, context="floor", how="random")
    # In MLflow the loss on random test images is eval_loss (training's heldout_loss uses the
    # first ones), precision and recall are sample_precision and sample_recall (precision is a
    # param too).
    run.log_metrics({"eval_loss": headline["heldout_loss"], **mlflow_scores(headline["quality"]),
                     **mlflow_scores(headline["floor"], "floor_")})
    if run.parent_model_id:  # the logged model's page shows its quality too
        run.log_metrics({"eval_loss": headline["heldout_loss"],
                         **mlflow_scores(headline["quality"])}, model_id=run.parent_model_id)
    run.log_table({"digit": list(range(10)),
                   **{group: [metrics[group][f"class_fraction_{d}"] for d in range(10)]
                      for group in ("quality", "floor")}}, "class_balance.json")
    run.log_table({"t": [int(k.removeprefix("psnr_t")) for k in detail if k.startswith("psnr_t")],
                   "psnr_db": [v for k, v in detail.items() if k.startswith("psnr_t")]}, "psnr.json")
    run.log_artifact(out_dir / "metrics.json")
    run.log_artifact(out_dir / "detail.json")
    run.finish()
    accuracy = (f", conditional accuracy {metrics['quality']['conditional_accuracy']:.3f}"
                if labels is not None else "")
    print(f"{stage}: held-out loss {metrics['heldout_loss']:.4f}, FID {metrics['quality']['fid']:.2f} "
          f"(floor {metrics['floor']['fid']:.2f}){accuracy} on {n} samples")


if __name__ == "__main__":
    main()
