"""Sample quality against training length, precision and sampler, for one model on one machine.

    python -m benchmarks.quality --model ddpm --epochs 6 --eval-at 2,4,6 --precision bf16 \
        --sampler ancestral:100 --sampler ddim:50 --n-samples 2000 --json out.json [--grids DIR]

Trains the model at the seed's config (params.yaml's net, schedule, lr, batch size and EMA
decay unless an option overrides one) on the full MNIST training set, and at each epoch of
``--eval-at`` samples ``--n-samples`` digits from the EMA weights with every ``--sampler``
(``name:steps``, DDIM with eta 0; ``name:steps:clip`` clips x0 in every step) and scores them as the evaluate stage does: FID, KID,
precision, recall and class balance on the classifier stage's features, against as many random
test digits, with the floor (as many real training digits) beside them. Needs
``data/MNIST/raw`` and ``models/classifier/classifier.pt`` (``dvc repro classifier``).
The JSON holds one row per (epoch, sampler) with the training time so far.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import yaml

from diffusion.classifier import load_classifier
from diffusion.data import save_grid
from diffusion.evaluation import Reference
from diffusion.io import save_json
from diffusion.mnist import load_mnist, random_subset
from diffusion.model import DiffusionModel
from diffusion.network import PRECISIONS, make_network, resolve_precision
from diffusion.process import make_process
from diffusion.sampling import SAMPLERS
from diffusion.training import TrainConfig, TrainState, make_state, train

RAW_DIR = Path("data/MNIST/raw")
KEPT = ("fid", "kid_mean", "precision", "recall", "class_tv")


def sampler_option(text: str) -> tuple[str, int, bool]:
    """``name:steps`` or ``name:steps:clip`` (x0 clipped to [-1, 1] in every step)."""
    name, steps, *clip = text.split(":")
    if (name not in SAMPLERS or not steps.isdigit() or int(steps) < 1
            or clip not in ([], ["clip"])):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed: use ancestral:STEPS or ddim:STEPS, optionally with :clip")
    return name, int(steps), bool(clip)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ddpm", help="a model of params.yaml's models")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--eval-at", default="", help="comma-separated epochs (default: the last)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--seed", type=int, default=None, help="default: params.yaml's seed")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--sampler", type=sampler_option, action="append", default=None)
    parser.add_argument("--n-samples", type=int, default=2000)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--grids", type=Path, default=None, help="folder for 64-digit grids")
    args = parser.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    if args.model not in params["models"]:
        parser.error(f"--model {args.model} is not one of params.yaml's models {params['models']}")
    seed = params["seed"] if args.seed is None else args.seed
    samplers = args.sampler or [("ancestral", 100, False)]
    eval_at = sorted({int(e) for e in args.eval_at.split(",") if e} or {args.epochs})

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(args.precision, device)
    train_params = params["train"]
    config = TrainConfig(epochs=args.epochs, batch_size=train_params["batch_size"],
                         lr=args.lr or train_params["lr"], ema_decay=train_params["ema_decay"],
                         holdout_subset=1000, seed=seed, precision=precision)
    process = make_process(params[args.model])
    torch.manual_seed(seed)
    net = make_network(params["net"])
    state = make_state(net, config, device)
    train_images = load_mnist(RAW_DIR, train=True)[0].to(device)
    test_images = load_mnist(RAW_DIR, train=False)[0].to(device)

    classifier = load_classifier(Path("models/classifier/classifier.pt"), device)
    reference = Reference.of(classifier, random_subset(test_images, args.n_samples, seed),
                             random_subset(train_images, args.n_samples, seed), seed=seed)
    floor = reference.floor
    rows: list[dict] = []
    train_seconds = 0.0

    def on_epoch(state: TrainState, record) -> None:
        nonlocal train_seconds
        train_seconds += record.seconds
        print(f"epoch {record.epoch}: loss {record.train_loss:.4f}, held-out "
              f"{record.heldout_loss:.4f}, {record.images_per_s:.0f} img/s", flush=True)
        if record.epoch not in eval_at:
            return
        model = DiffusionModel(state.ema, process, precision=precision)
        for name, steps, clip in samplers:
            started = time.perf_counter()
            images = model.sample(args.n_samples, steps=steps, sampler=name, eta=0.0,
                                  seed=seed, batch_size=1000, clip_x0=clip)
            sample_seconds = time.perf_counter() - started
            quality = reference.score(images)
            row = {"epoch": record.epoch, "sampler": name, "steps": steps, "clip_x0": clip,
                   "train_seconds": round(train_seconds, 1),
                   "sample_seconds": round(sample_seconds, 1),
                   "heldout_loss": record.heldout_loss,
                   **{k: quality[k] for k in KEPT},
                   "class_fractions": [quality[f"class_fraction_{d}"] for d in range(10)]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "class_fractions"}), flush=True)
            if args.grids:
                save_grid(images[:64], args.grids / f"{args.model}_{precision}_s{seed}_e{record.epoch:03d}"
                                                    f"_{name}{steps}{'_clip' if clip else ''}.png")
        save_json(result(), args.json)

    def result() -> dict:
        return {"model": args.model, "precision": precision, "seed": seed, "lr": config.lr,
                "n_samples": args.n_samples, "device": str(device),
                "processor": platform.processor() or platform.machine(),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "floor": {k: floor[k] for k in KEPT}, "rows": rows}

    train(state, process, train_images, test_images, config, on_epoch=on_epoch)
    save_json(result(), args.json)


if __name__ == "__main__":
    main()
