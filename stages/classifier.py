"""DVC stage classifier: train the small MNIST classifier whose features score sample quality.

Writes ``models/classifier/classifier.pt`` and ``results/classifier/metrics.json`` (accuracy on
all 10000 test digits). It learns from the first ``classifier.train_subset`` training digits
(0 = all 60000).
Nothing is downloaded: the evaluation's feature network is trained here, on MNIST itself.
"""

from __future__ import annotations

import time

from diffusion.classifier import evaluate_accuracy, save_classifier, train_classifier
from diffusion.io import save_json
from diffusion.data import default_device
from pipeline.common import log_mnist, mnist_on, open_run, stage_main
from pipeline.params import load_params_or_exit
from pipeline.paths import CLASSIFIER_FILE, CLASSIFIER_RESULTS


@stage_main
def main() -> None:
    stage = "classifier"
    params = load_params_or_exit(stage)
    settings = params.classifier
    run = open_run(stage, "classifier")
    run.log_params({"seed": params.seed, "classifier": settings.as_dict()})
    device = default_device()
    train_images, train_labels = mnist_on(device, train=True, subset=settings.train_subset)
    test_images, test_labels = mnist_on(device, train=False)

    log_mnist(run, train=True, used=settings.train_subset, context="training")
    log_mnist(run, train=False, used=0, context="evaluation")

    def report(epoch: int, figures: dict[str, float]) -> None:
        print(f"classifier epoch {epoch}/{settings.epochs}: loss {figures['train_loss']:.4f}, "
              f"train acc {figures['train_accuracy']:.4f}, {figures['seconds']:.1f}s", flush=True)
        # cross_entropy, not train_loss: that name is the diffusion models' denoising loss
        run.log_metrics({"cross_entropy": figures["train_loss"],
                         "train_accuracy": figures["train_accuracy"]}, step=epoch)

    started = time.perf_counter()
    with run.system_metrics():
        classifier = train_classifier(train_images, train_labels, epochs=settings.epochs,
                                      batch_size=settings.batch_size, lr=settings.lr,
                                      seed=params.seed, device=device, report=report)
        accuracy = evaluate_accuracy(classifier, test_images, test_labels)
    seconds = time.perf_counter() - started

    save_classifier(classifier, CLASSIFIER_FILE)
    save_json({"test_accuracy": accuracy}, CLASSIFIER_RESULTS / "metrics.json")
    run.log_metrics({"test_accuracy": accuracy}, step=settings.epochs)
    run.set_tags({"train_seconds": f"{seconds:.1f}"})
    run.finish()
    print(f"{stage}: test accuracy {accuracy:.4f} after {settings.epochs} epochs "
          f"({seconds:.0f} s on {device})")


if __name__ == "__main__":
    main()
