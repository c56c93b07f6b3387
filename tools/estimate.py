"""How long ``dvc repro`` will take here, from a short measurement (``make repro`` runs this first).

    python -m tools.estimate [--no-wait] [--with quick.yaml]

On a machine without a GPU it times a few training steps and network evaluations of the
configured network at params.yaml's batch sizes and precision, multiplies them by the work the
params ask for (epochs x batches for both models; images x reverse steps for the sample, evaluate
and sweep stages; metrics and file writing are not counted), prints the total and how to run the quick experiment instead, and, on a
terminal, waits a few seconds so Ctrl-C can stop ``make repro`` before the long work starts.
``--with FILE`` estimates the experiment of an overrides file instead (``make quick``'s
quick.yaml, ``make cpu-hour``'s cpu-hour.yaml), and does not wait.
With CUDA it prints one line and returns: the defaults take minutes there.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from pathlib import Path

import torch

from diffusion.mnist import N_TEST, N_TRAIN
from diffusion.network import autocast, make_network, resolve_precision
from diffusion.process import make_process
from diffusion.training import TrainConfig, denoising_loss, make_state
from pipeline.params import PARAMS_FILE, ParamsError, read_yaml, validate
from tools import quick

WAIT_S = 10
TIMED_STEPS, TIMED_EVALUATIONS = 4, 3


def seconds_per_call(run, repeats: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls, after one untimed warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def measure(params: dict, device: torch.device) -> tuple[float, float]:
    """(seconds per training step at train.batch_size, seconds per network evaluation of one
    image at sample.batch_size, capped at 500 images so the measurement stays short)."""
    precision = resolve_precision(params["precision"], device)
    torch.manual_seed(0)
    net = make_network(params["net"])
    config = TrainConfig(**params["train"], seed=params["seed"], precision=precision,
                         data_scale=params["data"]["scale"])
    state = make_state(net, config, device)
    process = make_process(params[params["models"][0]])
    batch = params["train"]["batch_size"]
    x0 = torch.rand(batch, 1, 28, 28, device=device) * 2 - 1
    t = torch.randint(1, process.n_T + 1, (batch,), device=device)
    eps = torch.randn_like(x0)

    def train_step() -> None:
        loss = denoising_loss(state.net, process, x0, t, eps, precision)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()

    n = min(params["sample"]["batch_size"], 500)
    x, t_eval = x0[:1].expand(n, -1, -1, -1).contiguous(), torch.rand(n, device=device)

    @torch.no_grad()
    def evaluation() -> None:
        with autocast(device, precision):
            state.ema(x, t_eval)

    step = seconds_per_call(train_step, TIMED_STEPS)
    per_image = seconds_per_call(evaluation, TIMED_EVALUATIONS) / n
    return step, per_image


def work(params: dict) -> dict[str, tuple[float, float]]:
    """Per stage: (training steps, single-image network evaluations) the params ask for."""
    train, sample, sweep, models = params["train"], params["sample"], params["sweep"], params["models"]
    images = params["data"]["train_subset"] or N_TRAIN
    holdout = train["holdout_subset"] or N_TEST
    n_T = {m: params[m]["n_T"] for m in models}
    return {
        "train": (len(models) * train["epochs"] * math.ceil(images / train["batch_size"]),
                  len(models) * train["epochs"] * holdout),
        "sample": (0, sum(sample["n_samples"] * min(sample["steps"], n_T[m]) for m in models)),
        "evaluate": (0, len(models) * params["evaluate"]["n_samples"]
                     * (1 + len(params["evaluate"]["psnr_t"]))),
        "sweep": (0, sum(sweep["n_samples"] * count * len(sweep["samplers"]) for m in models
                         for count in {min(s, n_T[m]) for s in sweep["steps"]})),
    }


def duration(seconds: float) -> str:
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{max(minutes, 1)} min"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.estimate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-wait", action="store_true", help="do not pause on a terminal")
    parser.add_argument("--with", dest="overrides", type=Path, default=None, metavar="FILE",
                        help="estimate params.yaml with this file's overrides (quick.yaml)")
    args = parser.parse_args()
    if torch.cuda.is_available():
        print(f"estimate: CUDA ({torch.cuda.get_device_name()}): the defaults take minutes here")
        return
    try:
        params = validate(read_yaml(Path(PARAMS_FILE)), make_process)
        if args.overrides is not None:
            params = quick.apply(params, quick.read_overrides(args.overrides), str(args.overrides))
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    device = torch.device("cpu")
    precision = resolve_precision(params["precision"], device)
    step, per_image = measure(params, device)
    stages = {name: steps * step + evaluations * per_image
              for name, (steps, evaluations) in work(params).items()}
    total = sum(stages.values())
    what = (f"`python -m tools.quick {args.overrides}`" if args.overrides
            else "`dvc repro` with params.yaml")
    print(f"estimate: no GPU; on this CPU ({torch.get_num_threads()} threads, {precision}) "
          f"{what} takes about {duration(total)} "
          f"({', '.join(f'{name} {duration(s)}' for name, s in stages.items())}; measured "
          f"{params['train']['batch_size'] / step:.0f} training images/s and "
          f"{1 / per_image:.0f} network evaluations/s).")
    if args.overrides is not None:
        return
    print("estimate: `make quick` runs a CPU-sized experiment instead (quick.yaml).", flush=True)
    if sys.stdin.isatty() and not args.no_wait:
        print(f"estimate: starting in {WAIT_S} s; press Ctrl-C to stop.", flush=True)
        try:
            time.sleep(WAIT_S)
        except KeyboardInterrupt:
            print("estimate: stopped; nothing was run.", file=sys.stderr)
            raise SystemExit(130) from None


if __name__ == "__main__":
    main()
