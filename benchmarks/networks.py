"""How close each denoiser runs to the machine: parameters, FLOPs, images/s and GFLOP/s.

    python -m benchmarks.networks [--device cpu|cuda] [--precision auto|bf16|fp32]
                                  [--batch-size 128] [--eval-batch 500] [--repeats 5] [--json PATH]

For each network of ``NETWORKS`` (params.yaml ``net`` sections: the seed's CNN and U-Nets of two
and three resolutions), one training step is forward + backward + Adam on a batch of
``--batch-size`` noisy images under autocast in ``--precision``; its FLOPs per image come from
``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions, forward and
backward), so GFLOP/s = GFLOP per image x images/s says how much of the machine's arithmetic a
network uses. Sampling evaluations/s are forward passes on ``--eval-batch`` images. The networks
are timed round-robin, ``--repeats`` times each, and medians are reported, so a machine whose
speed drifts affects them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.speed import device_name, synchronize
from diffusion.io import save_json
from diffusion.network import autocast, make_network, resolve_precision
from diffusion.options import PRECISIONS

CNN = {"kind": "cnn", "hidden": [16, 32, 32, 16], "activation": "gelu"}


def unet(channels: list[int], attention: bool, activation: str = "silu") -> dict:
    return {"kind": "unet", "channels": channels, "blocks": 1, "attention": attention,
            "activation": activation}


NETWORKS = {
    "CNN 16-32-32-16 (the seed's)": CNN,
    "U-Net [48, 96], attention 14x14 (params.yaml's)": unet([48, 96], True, "gelu"),
    "U-Net [32, 64]": unet([32, 64], False),
    "U-Net [32, 64], attention 14x14": unet([32, 64], True),
    "U-Net [16, 32, 64] (quick.yaml's)": unet([16, 32, 64], False),
    "U-Net [16, 32, 64], attention 7x7": unet([16, 32, 64], True),
    "U-Net [24, 48, 96]": unet([24, 48, 96], False),
    "U-Net [32, 64, 128]": unet([32, 64, 128], False),
}


class Bench:
    """One network with its optimiser and fixed inputs, ready to time."""

    def __init__(self, config: dict, device: torch.device, precision: str, batch: int,
                 eval_batch: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.net = make_network(config).to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-4)
        self.device, self.precision = device, precision
        generator = torch.Generator(device).manual_seed(seed)
        self.x = torch.randn(batch, 1, 28, 28, device=device, generator=generator)
        self.t = torch.rand(batch, device=device, generator=generator)
        self.x_eval = torch.randn(eval_batch, 1, 28, 28, device=device, generator=generator)
        self.t_eval = torch.rand(eval_batch, device=device, generator=generator)
        self.parameters = sum(p.numel() for p in self.net.parameters())
        with FlopCounterMode(display=False) as counter:
            self.step()
        self.gflop_per_image = counter.get_total_flops() / batch / 1e9

    def step(self) -> None:
        with autocast(self.device, self.precision):
            prediction = self.net(self.x, self.t)
        loss = (prediction.float() - self.x).square().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self) -> None:
        with autocast(self.device, self.precision):
            self.net(self.x_eval, self.t_eval)

    def rate(self, run, images: int, calls: int) -> float:
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(calls):
            run()
        synchronize(self.device)
        return images * calls / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.networks",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-batch", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2, help="training steps per timed run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("batch_size", "eval_batch", "repeats", "calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} = {getattr(args, name)} is not allowed: must be >= 1")
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    benches = {name: Bench(config, device, precision, args.batch_size, args.eval_batch, seed=0)
               for name, config in NETWORKS.items()}
    train: dict[str, list[float]] = {name: [] for name in benches}
    evaluate: dict[str, list[float]] = {name: [] for name in benches}
    for bench in benches.values():  # warm-up: first calls, allocator, kernel choice
        bench.step()
        bench.evaluate()
    for _ in range(args.repeats):
        for name, bench in benches.items():
            train[name].append(bench.rate(bench.step, args.batch_size, args.calls))
            evaluate[name].append(bench.rate(bench.evaluate, args.eval_batch, 1))

    command = "python -m benchmarks.networks " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    for name, bench in benches.items():
        images_per_s = statistics.median(train[name])
        rows.append({"network": name, "config": NETWORKS[name],
                     "parameters_m": bench.parameters / 1e6,
                     "gflop_per_image": bench.gflop_per_image,
                     "train_images_per_s": images_per_s,
                     "gflop_per_s": bench.gflop_per_image * images_per_s,
                     "eval_images_per_s": statistics.median(evaluate[name])})
    results = {"device": device_name(device), "torch": torch.__version__, "precision": precision,
               "command": command.strip(), "batch_size": args.batch_size, "rows": rows}
    print(f"{results['device']}, torch {results['torch']}, {precision}")
    print(f"command: {results['command']}")
    print(f"| network | params | GFLOP / image | train images/s | GFLOP/s | sampling evals/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['network']} | {row['parameters_m']:.2f} M | {row['gflop_per_image']:.3f} | "
              f"{row['train_images_per_s']:.0f} | {row['gflop_per_s']:.0f} | "
              f"{row['eval_images_per_s']:.0f} |")
    if args.json is not None:
        save_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
