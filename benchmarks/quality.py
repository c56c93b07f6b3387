"""Sample quality against training length, params, EMA and sampler, for one model on one machine.

    python -m benchmarks.quality --model ddpm --epochs 30 --eval-at 10,30 \
        --sampler ancestral:100 --sampler ddim:50:clip [-S train.lr=1e-3 ...] [--ema 0.9999 --raw] \
        --n-samples 2000 --json out.json [--grids DIR] [--save DIR]
    python -m benchmarks.quality --from models/ddpm/model.pt --sampler ddim:20:clip ... --json out.json

Trains ``--model`` with params.yaml's values (the seed's config unless ``-S key=value`` changes
one; the overrides are validated as params.yaml is) on its training set, and at each epoch of
``--eval-at`` samples ``--n-samples`` digits from the EMA weights with every ``--sampler``
(``name:steps``, DDIM with eta 0; ``name:steps:clip`` clips x0 in every step) and scores them
as the evaluate stage does (``diffusion.evaluation.Reference``): FID, KID, precision, recall
and class balance on the classifier stage's features, against as many random test digits,
with the floor (as many real training digits) beside them. ``--ema`` keeps further EMAs of the
same training run (``decay`` or ``decay:K``, K the warm-up constant of
``diffusion.training.ema_decay_at``, 10 by default) and ``--raw`` scores the raw weights too, each with the first
sampler, so EMA decays compare at equal training. ``--save`` writes the model file at each
evaluated epoch. ``--from FILE`` trains nothing: it scores the EMA weights of a model file
(``--save``'s or the train stage's) with every sampler; ``name:steps:unit`` starts sampling
from eps_T rather than the forward marginal (``sample.prior``); ``ddim:steps:eta=1`` is DDIM with
eta 1 (the posterior variance; eta 0 otherwise). Needs ``data/MNIST/raw`` and ``models/classifier/classifier.pt``
(``dvc repro classifier``). The JSON holds one row per (epoch, weights, sampler).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from diffusion.classifier import load_classifier
from diffusion.data import save_grid
from diffusion.evaluation import Reference
from diffusion.io import save_json
from diffusion.metrics import HEADLINE_SCORES
from diffusion.mnist import load_mnist, random_subset
from diffusion.model import DiffusionModel, load, save_model
from diffusion.network import make_network, resolve_precision
from diffusion.options import PRECISIONS, SAMPLERS
from diffusion.process import make_process
from diffusion.training import TrainConfig, TrainState, ema_update, make_state, train
from benchmarks.speed import device_name, require_positive
from pipeline.params import ParamsError
from pipeline.paths import CLASSIFIER_FILE, RAW_DIR
from tools.quick import apply

KEPT = tuple(score for score in HEADLINE_SCORES if score != "inception_score")


class SamplerChoice(NamedTuple):
    name: str        # ancestral or ddim
    steps: int
    clip: bool       # x0 clipped to the data range in every step
    prior: str       # exact or unit (sample.prior)
    eta: float = 0.0  # DDIM's eta: 0 deterministic, 1 the posterior variance beta_tilde

    def label(self) -> str:
        return (f"{self.name}{self.steps}{'_clip' if self.clip else ''}"
                f"{'_unit' if self.prior == 'unit' else ''}{f'_eta{self.eta:g}' if self.eta else ''}")


def sampler_option(text: str) -> SamplerChoice:
    """``name:steps``, then optionally ``:clip`` (x0 clipped to the data range in every step),
    ``:unit`` (start from eps_T) and, for DDIM, ``:eta=E`` (default 0)."""
    name, steps, *flags = text.split(":")
    etas = [flag.removeprefix("eta=") for flag in flags if flag.startswith("eta=")]
    try:
        eta = float(etas[-1]) if etas else 0.0
    except ValueError:
        eta = -1.0
    if (name not in SAMPLERS or not steps.isdigit() or int(steps) < 1
            or not set(flags) - {f"eta={e}" for e in etas} <= {"clip", "unit"}
            or len(etas) > 1 or not 0 <= eta <= 1 or (etas and name != "ddim")):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed: use ancestral:STEPS or ddim:STEPS, optionally with :clip "
            "and :unit, and for ddim :eta=E with E in [0, 1]")
    return SamplerChoice(name, int(steps), "clip" in flags, "unit" if "unit" in flags else "exact",
                         eta)


def ema_option(text: str) -> tuple[float, float]:
    """``decay`` or ``decay:K``: an EMA with that decay and warm-up constant (default 10)."""
    decay, _, warmup = text.partition(":")
    return float(decay), float(warmup or 10)


def override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use key=value")
    return key, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ddpm", help="a model of params.yaml's models")
    parser.add_argument("--epochs", type=int, default=0, help="required unless --from")
    parser.add_argument("--eval-at", default="", help="comma-separated epochs (default: the last)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="default: params.yaml's")
    parser.add_argument("--seed", type=int, default=None, help="default: params.yaml's seed")
    parser.add_argument("-S", "--set", type=override, action="append", default=[],
                        metavar="KEY=VALUE", help="a params.yaml value, as dvc exp run -S")
    parser.add_argument("--sampler", type=sampler_option, action="append", default=None)
    parser.add_argument("--ema", default="",
                        help="comma-separated further EMAs to score: decay or decay:K (warm-up)")
    parser.add_argument("--raw", action="store_true", help="score the raw weights too")
    parser.add_argument("--n-samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=1000,
                        help="images per sampling batch (on a CPU 128 runs faster than 1000)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--grids", type=Path, default=None, help="folder for 64-digit grids")
    parser.add_argument("--save", type=Path, default=None, help="folder for the model files")
    parser.add_argument("--from", dest="model_file", type=Path, default=None,
                        help="score this model file's EMA weights; train nothing")
    args = parser.parse_args()
    require_positive(parser, args, "batch_size")
    if args.model_file is not None:
        score_file(args)
        return
    if args.epochs < 1:
        parser.error("--epochs N (N >= 1) is required unless --from FILE is given")
    overrides = dict(args.set) | {"train.epochs": args.epochs}
    overrides |= {"seed": args.seed} if args.seed is not None else {}
    overrides |= {"precision": args.precision} if args.precision else {}
    try:
        params = apply(yaml.safe_load(Path("params.yaml").read_text()), overrides, "-S")
    except ParamsError as error:
        parser.error(str(error))
    if args.model not in params["models"]:
        parser.error(f"--model {args.model} is not one of params.yaml's models {params['models']}")
    seed, samplers = params["seed"], args.sampler or [SamplerChoice("ancestral", 100, False, "exact")]
    eval_at = sorted({int(e) for e in args.eval_at.split(",") if e} or {args.epochs})
    extra_decays = [ema_option(d) for d in args.ema.split(",") if d]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(params["precision"], device)
    config = TrainConfig(**params["train"], seed=seed, precision=precision,
                         data_scale=params["data"]["scale"])
    process = make_process(params[args.model])
    torch.manual_seed(seed)
    state = make_state(make_network(params["net"]), config, device)
    extra_emas = {decay: copy.deepcopy(state.ema) for decay in extra_decays}
    subset = params["data"]["train_subset"]
    train_images = load_mnist(RAW_DIR, train=True)[0][:subset or None].to(device)
    test_images = load_mnist(RAW_DIR, train=False)[0].to(device)

    classifier = load_classifier(CLASSIFIER_FILE, device)
    reference = Reference.of(classifier, random_subset(test_images, args.n_samples, seed),
                             random_subset(train_images, args.n_samples, seed), seed=seed)
    rows: list[dict] = []
    train_seconds = 0.0

    def after_step(step: int, steps: int) -> None:
        for (decay, warmup), ema in extra_emas.items():  # state.step counts the step just taken
            ema_update(ema, state.net, decay, state.step - 1, warmup)

    def score(weights: str, net: torch.nn.Module, record, sampler: SamplerChoice) -> None:
        model = DiffusionModel(net, process, {"data_scale": config.data_scale}, precision=precision)
        row = {"epoch": record.epoch, "weights": weights, "train_seconds": round(train_seconds, 1),
               "heldout_loss": record.heldout_loss,
               **score_model(model, reference, sampler, args, f"{args.model}_s{seed}_e{record.epoch:03d}_{weights}")}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "class_fractions"}), flush=True)

    def on_epoch(state: TrainState, record) -> None:
        nonlocal train_seconds
        train_seconds += record.seconds
        print(f"epoch {record.epoch}: loss {record.train_loss:.4f}, held-out "
              f"{record.heldout_loss:.4f}, {record.images_per_s:.0f} img/s", flush=True)
        if record.epoch not in eval_at:
            return
        if args.save:
            save_model(args.save / f"{args.model}_s{seed}_e{record.epoch:03d}.pt", state.net,
                       state.ema, process, {"model": args.model, "net": params["net"],
                                            "train": params["train"], "seed": seed,
                                            "data_scale": config.data_scale,
                                            "epochs_trained": record.epoch})
        for sampler in samplers:
            score(f"ema{config.ema_decay:g}:{config.ema_warmup:g}", state.ema, record, sampler)
        for (decay, warmup), ema in extra_emas.items():
            score(f"ema{decay:g}:{warmup:g}", ema, record, samplers[0])
        if args.raw:
            score("raw", state.net, record, samplers[0])
        save_json(result(), args.json)

    def result() -> dict:
        return {"model": args.model, "overrides": {k: v for k, v in args.set},
                "precision": precision, "seed": seed, "n_samples": args.n_samples,
                "device": device_name(device), "torch": torch.__version__,
                "floor": {k: reference.floor[k] for k in KEPT}, "rows": rows}

    train(state, process, train_images, test_images, config, on_epoch=on_epoch,
          progress=after_step if extra_emas else None)
    save_json(result(), args.json)


def score_model(model: DiffusionModel, reference: Reference, sampler: SamplerChoice,
                args: argparse.Namespace, grid_name: str) -> dict:
    """Sample ``args.n_samples`` digits with ``sampler`` and score them."""
    started = time.perf_counter()
    images = model.sample(args.n_samples, steps=sampler.steps, sampler=sampler.name, eta=sampler.eta,
                          seed=reference.seed, batch_size=args.batch_size, clip_x0=sampler.clip,
                          prior=sampler.prior)
    sample_seconds = time.perf_counter() - started
    quality = reference.score(images)
    if args.grids:
        save_grid(images[:64], args.grids / f"{grid_name}_{sampler.label()}.png")
    return {"sampler": sampler.name, "steps": sampler.steps, "clip_x0": sampler.clip,
            "prior": sampler.prior, **({"eta": sampler.eta} if sampler.eta else {}),
            "sample_seconds": round(sample_seconds, 1), **{k: quality[k] for k in KEPT},
            "class_fractions": [quality[f"class_fraction_{d}"] for d in range(10)]}


def score_file(args: argparse.Namespace) -> None:
    """``--from``: every sampler on one model file's EMA weights."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load(args.model_file, device=device, precision=args.precision or "auto")
    seed = model.config.get("seed", 42) if args.seed is None else args.seed
    classifier = load_classifier(CLASSIFIER_FILE, device)
    test_images = load_mnist(RAW_DIR, train=False)[0].to(device)
    train_images = load_mnist(RAW_DIR, train=True)[0].to(device)
    reference = Reference.of(classifier, random_subset(test_images, args.n_samples, seed),
                             random_subset(train_images, args.n_samples, seed), seed=seed)
    epoch = model.config.get("epochs_trained")
    # The pipeline names every model file model.pt: the grids are named by the model it holds.
    grid_name = f"{model.config.get('model', args.model_file.stem)}_e{epoch}"
    rows = []
    for sampler in args.sampler or [SamplerChoice("ancestral", 100, False, "exact")]:
        rows.append({"epoch": epoch, **score_model(model, reference, sampler, args, grid_name)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "class_fractions"}), flush=True)
        save_json({"model_file": str(args.model_file), "seed": seed, "n_samples": args.n_samples,
                   "device": device_name(device), "torch": torch.__version__,
                   "floor": {k: reference.floor[k] for k in KEPT}, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
