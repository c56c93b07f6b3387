"""FID and conditional accuracy against the classifier-free guidance weight w, for one model.

    python -m benchmarks.guidance --model ddpm --epochs 1 -S net.classes=10 [-S key=value ...] \
        --guidance 0,0.5,1,2,4 --sampler ancestral:100:clip --n-samples 500 --json out.json \
        [--grids DIR] [--save FILE]
    python -m benchmarks.guidance --from FILE --guidance 0,1,2 ... --json out.json

Trains ``--model`` conditioned on the digit with params.yaml's values changed by ``-S`` (as
``benchmarks.quality`` does; ``net.classes`` must be 10), or takes the EMA weights of a model file
(``--from``), then for each w of ``--guidance`` samples ``--n-samples`` digits, 0 to 9 in turn,
and scores them as the evaluate stage does: FID, precision, recall and class TV against as many
random test digits (the floor beside them), and the conditional accuracy, the fraction the
classifier reads as the digit asked for. ``--grids`` writes a 10 x 10 grid per w, one row per
digit. Needs ``data/MNIST/raw`` and ``models/classifier/classifier.pt`` (``dvc repro classifier``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from benchmarks.quality import KEPT, SamplerChoice, override, sampler_option
from benchmarks.speed import device_name
from diffusion.classifier import load_classifier
from diffusion.data import save_grid
from diffusion.evaluation import Reference
from diffusion.io import save_json
from diffusion.metrics import CONDITIONAL_ACCURACY
from diffusion.mnist import load_mnist, random_subset
from diffusion.model import DiffusionModel, load, save_model
from diffusion.network import make_network, resolve_precision
from diffusion.process import make_process
from diffusion.training import TrainConfig, make_state, train
from pipeline.params import ParamsError
from pipeline.paths import CLASSIFIER_FILE, RAW_DIR
from tools.quick import apply


def trained_model(args: argparse.Namespace, parser: argparse.ArgumentParser,
                  device: torch.device) -> tuple[DiffusionModel, dict]:
    """Train ``args.model`` with its labels; the model (EMA weights) and a summary of the run."""
    overrides = dict(args.set) | {"train.epochs": args.epochs}
    try:
        params = apply(yaml.safe_load(Path("params.yaml").read_text()), overrides, "-S")
    except ParamsError as error:
        parser.error(str(error))
    if params["net"]["classes"] != 10:
        parser.error("a guidance run needs a conditional network: add -S net.classes=10")
    precision = resolve_precision(params["precision"], device)
    config = TrainConfig(**params["train"], seed=params["seed"], precision=precision,
                         data_scale=params["data"]["scale"])
    process = make_process(params[args.model])
    torch.manual_seed(params["seed"])
    state = make_state(make_network(params["net"]), config, device)
    subset = params["data"]["train_subset"] or None
    images, labels = (x[:subset].to(device) for x in load_mnist(RAW_DIR, train=True))
    test_images, test_labels = (x.to(device) for x in load_mnist(RAW_DIR, train=False))

    def on_epoch(state, record) -> None:
        print(f"epoch {record.epoch}: loss {record.train_loss:.4f}, held-out "
              f"{record.heldout_loss:.4f}, {record.images_per_s:.0f} img/s, "
              f"{record.seconds:.0f} s", flush=True)

    train(state, process, images, test_images, config, on_epoch=on_epoch,
          train_labels=labels, test_labels=test_labels)
    file_config = {"model": args.model, "net": params["net"], "train": params["train"],
                   "seed": params["seed"], "data_scale": config.data_scale,
                   "epochs_trained": state.epoch}
    if args.save:
        save_model(args.save, state.net, state.ema, process, file_config)
    last = state.log[-1]
    return (DiffusionModel(state.ema, process, file_config, precision=precision),
            {"overrides": dict(args.set), "epochs": state.epoch, "heldout_loss": last.heldout_loss,
             "train_seconds": round(sum(r.seconds for r in state.log), 1)})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guidance",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ddpm", help="a model of params.yaml's models")
    parser.add_argument("--epochs", type=int, default=0, help="required unless --from")
    parser.add_argument("-S", "--set", type=override, action="append", default=[],
                        metavar="KEY=VALUE", help="a params.yaml value, as dvc exp run -S")
    parser.add_argument("--from", dest="model_file", type=Path, default=None,
                        help="score this model file's EMA weights; train nothing")
    parser.add_argument("--guidance", default="0,0.5,1,2,4", help="comma-separated weights w >= 0")
    parser.add_argument("--sampler", type=sampler_option,
                        default=SamplerChoice("ancestral", 100, True, "exact"))
    parser.add_argument("--n-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--grids", type=Path, default=None, help="folder for 10 x 10 grids")
    parser.add_argument("--save", type=Path, default=None, help="write the trained model file")
    args = parser.parse_args()
    weights = [float(w) for w in args.guidance.split(",") if w]
    if not weights or min(weights) < 0:
        parser.error(f"--guidance {args.guidance} is not allowed: give weights w >= 0, e.g. 0,1,2")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model_file is not None:
        model, run = load(args.model_file, device=device), {"from": str(args.model_file)}
        if not model.classes:
            parser.error(f"--from {args.model_file}: the model is unconditional (net.classes = 0)")
    elif args.epochs >= 1:
        model, run = trained_model(args, parser, device)
    else:
        parser.error("--epochs N (N >= 1) is required unless --from FILE is given")

    classifier = load_classifier(CLASSIFIER_FILE, device)
    reference = Reference.of(
        classifier, random_subset(load_mnist(RAW_DIR, train=False)[0], args.n_samples, args.seed),
        random_subset(load_mnist(RAW_DIR, train=True)[0], args.n_samples, args.seed),
        seed=args.seed)
    name, steps, clip, prior, eta = args.sampler
    rows = []
    for weight in weights:
        started = time.perf_counter()
        images = model.sample(args.n_samples, steps=steps, sampler=name, eta=eta, seed=args.seed,
                              batch_size=500, clip_x0=clip, prior=prior, digit=list(range(10)),
                              guidance=weight)
        seconds = time.perf_counter() - started
        quality = reference.score(images, model.labels(list(range(10)), args.n_samples))
        rows.append({"guidance": weight, "sample_seconds": round(seconds, 1),
                     **{k: quality[k] for k in (*KEPT, CONDITIONAL_ACCURACY)}})
        print(f"w = {weight:g}: conditional accuracy {quality[CONDITIONAL_ACCURACY]:.3f}, "
              f"FID {quality['fid']:.2f} (floor {reference.floor['fid']:.2f}), class TV "
              f"{quality['class_tv']:.3f}, {seconds:.0f} s", flush=True)
        if args.grids:  # row d holds ten draws of digit d
            grid = model.sample(100, steps=steps, sampler=name, eta=eta, seed=args.seed,
                                clip_x0=clip, prior=prior, digit=[d for d in range(10) for _ in range(10)],
                                guidance=weight)
            save_grid(grid, args.grids / f"{args.model}_w{weight:g}.png", nrow=10)
    sampler = f"{name}:{steps}{':clip' if clip else ''}{f':eta={eta:g}' if eta else ''}"
    save_json({"model": args.model, **run, "sampler": sampler,
               "n_samples": args.n_samples, "seed": args.seed, "device": device_name(device),
               "torch": torch.__version__, "floor": {k: reference.floor[k] for k in KEPT},
               "rows": rows}, args.json)


if __name__ == "__main__":
    main()
