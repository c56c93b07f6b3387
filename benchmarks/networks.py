"""How close each denoiser runs to the machine: parameters, FLOPs, images/s and GFLOP/s.

    python -m benchmarks.networks [--device cpu|cuda] [--precision auto|bf16|fp32]
                                  [--batch-size 128] [--eval-batch 500 [B ...]] [--only TEXT]
                                  [--repeats 5] [--json PATH]

For each network of ``NETWORKS`` (params.yaml ``net`` sections: the seed's CNN and U-Nets of two
and three resolutions), one training step is forward + backward + Adam on a batch of
``--batch-size`` noisy images under autocast in ``--precision``; its FLOPs per image come from
``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions, forward and
backward), so GFLOP/s = GFLOP per image x images/s says how much of the machine's arithmetic a
network uses. Sampling evaluations/s are forward passes on ``--eval-batch`` images, one column per
batch size given: on a CPU a batch whose activations outgrow the cache runs fewer images/s.
``--only`` keeps the networks whose name contains the text. The networks are timed round-robin,
``--repeats`` times each, and medians are reported, so a machine whose speed drifts affects them
alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.speed import device_name, require_positive, synchronize
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
                 eval_batches: list[int], seed: int) -> None:
        torch.manual_seed(seed)
        self.net = make_network(config).to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-4)
        self.device, self.precision = device, precision
        generator = torch.Generator(device).manual_seed(seed)
        self.x = torch.randn(batch, 1, 28, 28, device=device, generator=generator)
        self.t = torch.rand(batch, device=device, generator=generator)
        self.x_eval = torch.randn(max(eval_batches), 1, 28, 28, device=device, generator=generator)
        self.t_eval = torch.rand(max(eval_batches), device=device, generator=generator)
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
    def evaluate(self, batch: int) -> None:
        with autocast(self.device, self.precision):
            self.net(self.x_eval[:batch], self.t_eval[:batch])

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
    parser.add_argument("--eval-batch", type=int, nargs="+", default=[500])
    parser.add_argument("--only", default="", help="only the networks whose name contains this")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2, help="training steps per timed run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    require_positive(parser, args, "batch_size", "eval_batch", "repeats", "calls")
    chosen = {name: config for name, config in NETWORKS.items() if args.only in name}
    if not chosen:
        parser.error(f"--only {args.only!r} matches no network: give part of a name, one of "
                     f"{', '.join(map(repr, NETWORKS))}")
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    benches = {name: Bench(config, device, precision, args.batch_size, args.eval_batch, seed=0)
               for name, config in chosen.items()}
    train: dict[str, list[float]] = {name: [] for name in benches}
    evaluate = {name: {batch: [] for batch in args.eval_batch} for name in benches}
    for bench in benches.values():  # warm-up: first calls, allocator, kernel choice
        bench.step()
        for batch in args.eval_batch:
            bench.evaluate(batch)
    for _ in range(args.repeats):
        for name, bench in benches.items():
            train[name].append(bench.rate(bench.step, args.batch_size, args.calls))
            for batch, rates in evaluate[name].items():
                rates.append(bench.rate(partial(bench.evaluate, batch), batch, 1))

    command = "python -m benchmarks.networks " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    for name, bench in benches.items():
        images_per_s = statistics.median(train[name])
        rows.append({"network": name, "config": NETWORKS[name],
                     "parameters_m": bench.parameters / 1e6,
                     "gflop_per_image": bench.gflop_per_image,
                     "train_images_per_s": images_per_s,
                     "gflop_per_s": bench.gflop_per_image * images_per_s,
                     "eval_images_per_s": {str(batch): statistics.median(rates)
                                           for batch, rates in evaluate[name].items()}})
    results = {"device": device_name(device), "torch": torch.__version__, "precision": precision,
               "command": command.strip(), "batch_size": args.batch_size, "rows": rows}
    print(f"{results['device']}, torch {results['torch']}, {precision}")
    print(f"command: {results['command']}")
    sampling = "".join(f" sampling evals/s, batch {batch} |" for batch in args.eval_batch)
    print(f"| network | params | GFLOP / image | train images/s | GFLOP/s |{sampling}")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(args.eval_batch))
    for row in rows:
        rates = "".join(f" {rate:.0f} |" for rate in row["eval_images_per_s"].values())
        print(f"| {row['network']} | {row['parameters_m']:.2f} M | {row['gflop_per_image']:.3f} | "
              f"{row['train_images_per_s']:.0f} | {row['gflop_per_s']:.0f} |{rates}")
    if args.json is not None:
        save_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
