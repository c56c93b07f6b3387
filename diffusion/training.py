"""Training: the denoising objective of Ho et al. (2020), Algorithm 1, for any noise process.

Each step draws t ~ U{1..n_T} and eps from the process, forms x_t (eq. 4) and regresses the
network's output on the process's training target (eps) with a mean squared error (eq. 14).
An exponential moving average (EMA) of the weights is kept for sampling and evaluation.

The loop is written for a small network on a fast device: the whole training set sits on the
device as one uint8 tensor, batches are slices of a per-epoch permutation drawn on the device,
and nothing reads a value back to the host inside an epoch (losses accumulate on the device and
are read once per epoch). All randomness comes from ``seed``: ``TrainState.generator`` draws
each epoch's permutation, and each epoch's t and noise come from a generator seeded from
(seed, epoch, rank), so on the CPU the same inputs give bit-identical weights, and a run resumed
after any epoch continues exactly.

Mixed precision: ``TrainConfig.precision`` "auto" runs the network under bf16 autocast where the
device multiplies bf16 natively (CUDA, CPUs with AMX-BF16 or AVX512-BF16) and in float32
elsewhere; "bf16" and "fp32" force one or the other. Only the network's arithmetic is affected: x_t, the noise (the Gamma draw is float64, see process.py) and the loss
stay float32.

Several processes: under ``torchrun`` (see diffusion/distributed.py) the network is wrapped in
DistributedDataParallel, ``batch_size`` is per process, each process trains on its shard of the
shared permutation, the epoch loss is summed over processes once per epoch, and rank 0 alone
computes the held-out loss and runs the callbacks.

State for resuming (weights, EMA, optimiser, generators, log) can be saved after each epoch and
loaded to continue exactly where a killed run stopped.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from diffusion import distributed
from diffusion.data import to_model_range
from diffusion.network import autocast
from diffusion.process import NoiseProcess


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 128
    lr: float = 2e-4
    ema_decay: float = 0.999
    holdout_subset: int = 0   # test images for the held-out loss; 0 = all
    seed: int = 42
    compile: bool = False
    precision: str = "auto"   # "auto" (bf16 where the device has it natively) | "bf16" | "fp32"


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    heldout_loss: float
    images_per_s: float
    seconds: float


@dataclass
class TrainState:
    """Everything a resumed run needs to continue bit-identically."""

    net: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    epoch: int = 0
    step: int = 0
    log: list[EpochRecord] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
            "epoch": self.epoch, "step": self.step, "log": [asdict(r) for r in self.log],
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.log = [EpochRecord(**r) for r in state["log"]]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def ema_update(ema: nn.Module, net: nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * net, with d warmed up as min(decay, (1 + step)/(10 + step)).

    The warm-up keeps short runs (a few hundred steps) from sampling with near-initial weights.
    """
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        ema_params = list(ema.parameters())
        torch._foreach_lerp_(ema_params, list(net.parameters()), 1.0 - d)


def maybe_compile(net: nn.Module, enabled: bool, log: Callable[[str], None] = print) -> nn.Module:
    """torch.compile ``net`` when asked and available; otherwise the eager module."""
    if not enabled:
        return net
    try:
        return torch.compile(net)
    except Exception as error:  # e.g. no compiler toolchain: eager mode is still correct
        log(f"torch.compile unavailable ({type(error).__name__}: {error}); using eager mode")
        return net


def noise_generator(device: torch.device, seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator of one epoch's t and noise on one process: distinct for every (epoch, rank)."""
    key = hashlib.sha256(f"{seed}/{epoch}/{rank}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(key[:8], "little") >> 1)


def denoising_loss(net: nn.Module, process: NoiseProcess, x0: torch.Tensor, t: torch.Tensor,
                   eps: torch.Tensor, precision: str = "auto") -> torch.Tensor:
    """MSE between the network's prediction at x_t and the process's target (Ho eq. 14)."""
    x_t = process.q_sample(x0, t, eps)
    with autocast(x0.device, precision):
        prediction = net(x_t, t.float() / process.n_T)
    return torch.mean((prediction.float() - process.training_target(x0, eps)) ** 2)


@torch.no_grad()
def heldout_loss(net: nn.Module, process: NoiseProcess, images: torch.Tensor, *, seed: int,
                 batch_size: int = 1000, precision: str = "auto") -> float:
    """Mean denoising loss on ``images`` (uint8, on the device) with noise fixed by ``seed``.

    The same t and eps every call, so values from successive epochs are comparable.
    """
    device = images.device
    generator = torch.Generator(device).manual_seed(seed)
    was_training = net.training
    net.eval()
    total = torch.zeros((), device=device)
    for start in range(0, images.shape[0], batch_size):
        x0 = to_model_range(images[start:start + batch_size])
        t = torch.randint(1, process.n_T + 1, (x0.shape[0],), device=device, generator=generator)
        eps = process.noise(t, x0.shape, device=device, generator=generator)
        total += denoising_loss(net, process, x0, t, eps, precision) * x0.shape[0]
    net.train(was_training)
    return total.item() / images.shape[0]


def make_state(net: nn.Module, config: TrainConfig, device: torch.device) -> TrainState:
    """Fresh training state: EMA copy, Adam (fused on CUDA) and the permutation generator."""
    net = net.to(device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, fused=device.type == "cuda")
    generator = torch.Generator(device).manual_seed(config.seed)
    return TrainState(net, ema, optimizer, generator)


def train(state: TrainState, process: NoiseProcess, train_images: torch.Tensor,
          test_images: torch.Tensor, config: TrainConfig, *,
          on_epoch: Callable[[TrainState, EpochRecord], None] | None = None,
          on_checkpoint: Callable[[TrainState], None] | None = None,
          progress: Callable[[int, int], None] | None = None) -> TrainState:
    """Train ``state`` to ``config.epochs`` epochs, continuing from ``state.epoch``.

    ``train_images`` and ``test_images`` are uint8 (N, 28, 28) tensors already on the device.
    After each epoch ``on_epoch(state, record)`` runs (grids, logging), then
    ``on_checkpoint(state)``, which should save ``state.state_dict()`` so a killed run can resume.
    ``progress(step_in_epoch, steps_per_epoch)`` is called every step for progress bars.

    Under a process group (torchrun) every process calls this with the same arguments; the
    callbacks then run on rank 0 only, and the others wait for them.
    """
    device = train_images.device
    n = train_images.shape[0]
    world = distributed.world()
    # Each process takes every world_size-th index of the shared permutation; wrapping around
    # pads the epoch to a multiple of world_size, so all processes take the same steps.
    per_rank = math.ceil(n / world.world_size)
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    holdout = test_images[:config.holdout_subset] if config.holdout_subset else test_images
    model = state.net
    if world.parallel:
        model = DistributedDataParallel(
            state.net, device_ids=[device] if device.type == "cuda" else None,
            broadcast_buffers=False)  # the only buffer (time frequencies) is a constant
        with torch.no_grad():  # DDP copies rank 0's weights to every rank; the EMA too
            distributed.broadcast_from_main(list(state.ema.parameters()))
    model = maybe_compile(model, config.compile)
    state.net.train()
    while state.epoch < config.epochs:
        epoch = state.epoch + 1
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        nonfinite = torch.zeros(steps_per_epoch, device=device)
        permutation = torch.randperm(n, device=device, generator=state.generator)
        if world.parallel:
            padded = torch.cat([permutation, permutation[:per_rank * world.world_size - n]])
            permutation = padded[world.rank::world.world_size]
        generator = noise_generator(device, config.seed, epoch, world.rank)
        for i in range(steps_per_epoch):
            index = permutation[i * config.batch_size:(i + 1) * config.batch_size]
            x0 = to_model_range(train_images[index])
            t = torch.randint(1, process.n_T + 1, (x0.shape[0],), device=device,
                              generator=generator)
            eps = process.noise(t, x0.shape, device=device, generator=generator)
            loss = denoising_loss(model, process, x0, t, eps, config.precision)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            ema_update(state.ema, state.net, config.ema_decay, state.step)
            state.step += 1
            # Device-side bookkeeping only: no .item() inside the epoch.
            loss_sum += loss.detach() * x0.shape[0]
            nonfinite[i] = (~torch.isfinite(loss.detach())).float()
            if progress is not None:
                progress(i + 1, steps_per_epoch)
        # One reduction per epoch: [loss sum, non-finite flag per step], summed over processes.
        totals = distributed.all_reduce_sum(torch.cat([loss_sum.view(1), nonfinite]))
        if (totals[1:] > 0).any():
            bad = int(totals[1:].nonzero()[0, 0]) + 1
            raise NonFiniteLossError(
                f"training loss became non-finite at epoch {epoch}, step {bad} of "
                f"{steps_per_epoch}; the last good state is epoch {state.epoch}")
        train_seconds = time.perf_counter() - started
        images_seen = per_rank * world.world_size
        heldout = (heldout_loss(state.ema, process, holdout, seed=config.seed + 1,
                                precision=config.precision) if world.is_main else 0.0)
        if world.parallel:  # rank 0's value, so every process keeps the same log
            heldout = distributed.all_reduce_sum(
                torch.tensor(heldout, dtype=torch.float64, device=device)).item()
        record = EpochRecord(
            epoch=epoch,
            train_loss=totals[0].item() / images_seen,
            heldout_loss=heldout,
            images_per_s=images_seen / train_seconds,
            seconds=time.perf_counter() - started,
        )
        state.epoch = epoch
        state.log.append(record)
        if world.is_main:
            if on_epoch is not None:
                on_epoch(state, record)
            if on_checkpoint is not None:
                on_checkpoint(state)
        distributed.barrier()  # the other processes wait for rank 0's outputs
    return state

