"""Training and sampling speed of this project against a plain PyTorch loop, on one device.

    python -m benchmarks.speed [--device cpu|cuda] [--steps N] [--batch-size B] [--repeats R]
                               [--sample-n N] [--sample-steps S] [--data DIR] [--json PATH]
                               [--precision auto|bf16|fp32]

Measured on the same DenoiserCNN and batch size:

- train images/s. Ours: ``diffusion.training.train`` for one epoch of ``steps`` batches on the
  first steps x batch_size MNIST training images (device-resident uint8 data, EMA, the network
  in ``--precision``: by default bf16 autocast on CUDA and on CPUs with native bf16; fused Adam
  on CUDA). Reference, written the way the seed coursework trained:
  ``torchvision.datasets.MNIST`` with ToTensor + Normalize per item, a shuffled DataLoader, fp32,
  the DDPM forward process inline, Adam, and ``loss.item()`` every step.
- sampling network evaluations/s (images x steps / s). Ours: ``diffusion.sampling.sample``
  (ancestral, one batch of ``sample_n``) on an ``sample_steps``-step DDPM schedule. Reference:
  the plain Algorithm 2 loop of Ho et al. (2020) with Python-float coefficients.

Each figure is the median of ``repeats`` runs; ours and the reference alternate (in alternating
order) so that a machine whose speed drifts affects both alike, and ours/reference is the median
of the per-repeat ratios. One warm-up run of each comes
first and is not counted. Model construction and moving data to the device are not timed.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusion.io import save_json
from diffusion.mnist import load_mnist
from diffusion.network import NATIVE_BF16_CPU_FEATURES, PRECISIONS, DenoiserCNN, resolve_precision
from diffusion.process import GaussianProcess
from diffusion.sampling import sample
from diffusion.training import TrainConfig, make_state, train
from pipeline.params import PARAMS_FILE, read_yaml

BETAS = (1e-4, 0.02)
N_T = 1000
LR = 2e-4
# Short on a CPU (about a minute on 2 cores), long enough to reach a steady state on a GPU.
DEFAULTS = {"cpu": {"steps": 4, "sample_n": 64, "sample_steps": 10, "repeats": 3},
            "cuda": {"steps": 300, "sample_n": 2000, "sample_steps": 100, "repeats": 5}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - started


# --- ours ------------------------------------------------------------------------------------
def ours_train(images: torch.Tensor, steps: int, batch_size: int, device: torch.device,
               seed: int, precision: str = "auto") -> float:
    """Training images/s of diffusion.training.train on ``steps`` batches."""
    data = images[:steps * batch_size].to(device)
    seed_train = read_yaml(Path(PARAMS_FILE))["train"]  # the other keys: params.yaml's
    config = TrainConfig(**{**seed_train, "epochs": 1, "batch_size": batch_size, "lr": LR,
                            "holdout_subset": 1, "lr_schedule": "constant", "warmup": 0},
                         seed=seed, precision=precision, data_scale=1.0)
    torch.manual_seed(seed)
    state = make_state(DenoiserCNN(), config, device)
    process = GaussianProcess(BETAS, N_T)
    return data.shape[0] / seconds(lambda: train(state, process, data, data[:1], config), device)


def ours_sample(n: int, steps: int, device: torch.device, seed: int,
                precision: str = "auto") -> float:
    """Network evaluations/s of diffusion.sampling.sample (ancestral, ``steps`` steps)."""
    torch.manual_seed(seed)
    net = DenoiserCNN().to(device)
    process = GaussianProcess(BETAS, steps)
    generator = torch.Generator(device).manual_seed(seed)
    return n * steps / seconds(lambda: sample(net, process, n, device=device, generator=generator,
                                              precision=precision), device)


# --- reference: a plain loop, as the seed coursework wrote it ---------------------------------
def reference_train(dataset, steps: int, batch_size: int, device: torch.device, seed: int) -> float:
    """Training images/s of a DataLoader + fp32 + loss.item() loop on ``steps`` batches."""
    from torch.utils.data import DataLoader, Subset

    n = steps * batch_size
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    net = DenoiserCNN().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    alpha_bar = GaussianProcess(BETAS, N_T).alpha_bar.float().to(device)
    losses = []

    def epoch() -> None:
        for x, _ in loader:
            x = x.to(device)
            t = torch.randint(1, N_T + 1, (x.shape[0],)).to(device)
            eps = torch.randn_like(x)
            ab = alpha_bar[t].view(-1, 1, 1, 1)
            x_t = ab.sqrt() * x + (1 - ab).sqrt() * eps
            loss = F.mse_loss(net(x_t, t.float() / N_T), eps)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

    return n / seconds(epoch, device)


def reference_sample(n: int, steps: int, device: torch.device, seed: int) -> float:
    """Network evaluations/s of a plain Ho et al. Algorithm 2 loop."""
    torch.manual_seed(seed)
    net = DenoiserCNN().to(device).eval()
    process = GaussianProcess(BETAS, steps)
    beta, alpha, alpha_bar = (v.tolist() for v in (process.beta, process.alpha, process.alpha_bar))

    @torch.no_grad()
    def loop() -> None:
        x = torch.randn(n, 1, 28, 28, device=device)
        for t in range(steps, 0, -1):
            eps = net(x, torch.full((n,), t / steps, device=device))
            x = (x - beta[t] / math.sqrt(1 - alpha_bar[t]) * eps) / math.sqrt(alpha[t])
            if t > 1:
                x = x + math.sqrt(beta[t]) * torch.randn_like(x)

    return n * steps / seconds(loop, device)


# --- driver ----------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = [f for f in NATIVE_BF16_CPU_FEATURES if torch.cpu.get_capabilities().get(f) is True]
    return (f"{name}, {torch.get_num_threads()} threads, "
            f"native bf16: {', '.join(bf16) if bf16 else 'none'}")


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Exit 2 with a one-line error for the first option of ``names`` (argparse dests) below 1;
    an option that takes several values is checked value by value."""
    for name in names:
        value = getattr(args, name)
        for item in value if isinstance(value, list) else [value]:
            if item < 1:
                parser.error(f"--{name.replace('_', '-')} = {item} is not allowed: must be >= 1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", type=int, help="training steps per run (CPU 4, CUDA 300)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch (default 128)")
    parser.add_argument("--repeats", type=int, help="runs per figure; the median is reported")
    parser.add_argument("--sample-n", type=int, help="images per sampling run (CPU 64, CUDA 2000)")
    parser.add_argument("--sample-steps", type=int,
                        help="reverse steps per sampling run (CPU 10, CUDA 100)")
    parser.add_argument("--data", type=Path, default=Path("data/MNIST/raw"),
                        help="a .../MNIST/raw folder with the four IDX files")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="ours: the network's arithmetic (the reference is always fp32)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    cuda = torch.cuda.is_available()
    if args.device.type not in DEFAULTS or (args.device.type == "cuda" and not cuda):
        parser.error(f"--device {args.device} is not available: use cpu"
                     + (" or cuda" if cuda else ""))
    for name, value in DEFAULTS[args.device.type].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    require_positive(parser, args, "steps", "batch_size", "repeats", "sample_n", "sample_steps")
    if args.sample_steps < 2:
        parser.error("--sample-steps must be >= 2")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torchvision
    from torchvision import transforms

    device, seed = args.device, args.seed
    images, _ = load_mnist(args.data, train=True)
    if images.shape[0] < args.steps * args.batch_size:
        raise SystemExit(f"error: --steps x --batch-size = {args.steps * args.batch_size} is more "
                         f"than the {images.shape[0]} training images in {args.data}")
    # torchvision reads <root>/MNIST/raw; Normalize maps ToTensor's [0, 1] to [-1, 1] like ours.
    dataset = torchvision.datasets.MNIST(
        str(args.data.resolve().parent.parent), train=True, download=False,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]))

    runs = {
        ("train", "ours"):
            lambda steps: ours_train(images, steps, args.batch_size, device, seed, args.precision),
        ("train", "reference"):
            lambda steps: reference_train(dataset, steps, args.batch_size, device, seed),
        ("sampling", "ours"):
            lambda steps: ours_sample(args.sample_n, steps, device, seed, args.precision),
        ("sampling", "reference"): lambda steps: reference_sample(args.sample_n, steps, device, seed),
    }
    for (task, _), run in runs.items():  # warm-up: allocator, cuDNN algorithm choice, first calls
        run(1 if task == "train" else 2)
    figures: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for repeat in range(args.repeats):
        for task in ("train", "sampling"):
            order = ("ours", "reference") if repeat % 2 == 0 else ("reference", "ours")
            for who in order:
                steps = args.steps if task == "train" else args.sample_steps
                figures[task, who].append(runs[task, who](steps))

    command = "python -m benchmarks.speed " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {
        "date": datetime.date.today().isoformat(),
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "precision": resolve_precision(args.precision, device),
        "command": command.strip(),
        "settings": {k: getattr(args, k) for k in ("steps", "batch_size", "repeats", "sample_n",
                                                   "sample_steps", "seed", "precision")},
    }
    for task, unit in (("train", "train_images_per_s"), ("sampling", "sampling_evals_per_s")):
        ours = statistics.median(figures[task, "ours"])
        reference = statistics.median(figures[task, "reference"])
        # The ratio of each repeat's adjacent pair, then the median: robust to a drifting machine.
        ratio = statistics.median(a / b for a, b in zip(figures[task, "ours"],
                                                        figures[task, "reference"]))
        results[unit] = {"ours": ours, "reference": reference, "ratio": ratio,
                         "runs": {who: figures[task, who] for who in ("ours", "reference")}}

    print(f"device {results['device']} ({results['device_name']}), torch {results['torch']}, "
          f"ours in {results['precision']}, reference in fp32")
    print(f"command: {results['command']}")
    print(f"median of {args.repeats}: {'':<2}{'ours':>12} {'reference':>12} {'ours/ref':>9}")
    for label, unit in (("train images/s", "train_images_per_s"),
                        ("sampling evals/s", "sampling_evals_per_s")):
        row = results[unit]
        print(f"{label:<22}{row['ours']:>12.1f} {row['reference']:>12.1f} {row['ratio']:>8.2f}x")
    if args.json is not None:
        save_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
