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

A class-conditional network (``net.classes`` = 10) is trained on each image's digit, replaced
by ``NO_LABEL`` with probability ``label_drop`` (``drop_labels``), so that one network learns
the conditional and the unconditional prediction that classifier-free guidance mixes (Ho and
Salimans 2022, Algorithm 1).

Mixed precision: ``TrainConfig.precision`` "auto" runs the network under bf16 autocast where the
device multiplies bf16 natively (CUDA, CPUs with AMX-BF16 or AVX512-BF16) and in float32
elsewhere; "bf16" and "fp32" force one or the other. Only the network's arithmetic is affected: x_t, the noise (the Gamma draw is float64, see process.py) and the loss
stay float32.

Several processes: under ``torchrun`` (see diffusion/distributed.py) the network is wrapped in
DistributedDataParallel, ``batch_size`` is per process, each process trains on its shard of the
shared permutation, the epoch loss is summed over processes once per epoch, and rank 0 alone
computes the held-out loss and runs the callbacks.

``TrainLoop`` wraps ``train`` with what a run needs around it (as improved-diffusion's
``TrainLoop``): after each epoch it writes the log and, every few epochs, a sample grid from fixed
noise, then the resume state (weights, EMA, optimiser, generators, log, grids) through a
``Checkpoint``, from which a killed run continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import csv
import glob
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from diffusion import distributed
from diffusion.data import save_grid, to_model_range, to_uint8
from diffusion.io import ModelFileError, atomic_path, load_torch, save_torch
from diffusion.network import NO_LABEL, autocast
from diffusion.options import LR_SCHEDULES
from diffusion.process import NoiseProcess
from diffusion.sampling import sample


@dataclass
class TrainConfig:
    """params.yaml's ``train`` section (its comments say what each key means; the values,
    defaults included, live there only), with the run's seed, precision and data scale."""

    epochs: int
    batch_size: int
    lr: float
    ema_decay: float          # 0: the EMA is the raw weights
    warmup: int               # steps of linear lr warm-up (0: none)
    lr_schedule: str          # after the warm-up: constant | cosine | linear decay
    lr_floor: float           # cosine/linear: the lr at the last step, as a fraction of lr
    min_snr_gamma: float      # min-SNR-gamma loss weights (Hang et al. 2023); 0: plain MSE
    ema_warmup: float         # K of the EMA warm-up min(decay, (1 + step) / (K + step))
    label_drop: float         # conditional networks: the probability a label is dropped
    grad_clip: float          # clip the gradient's global L2 norm to this (0: no clipping)
    grid_every: int           # TrainLoop: a sample grid every N epochs, and after the last
    grid_size: int            # TrainLoop: digits per grid
    holdout_subset: int       # test images for the held-out loss; 0 = all
    compile: bool
    seed: int
    precision: str            # "auto" (bf16 where the device has it natively) | "bf16" | "fp32"
    data_scale: float         # images in [-data_scale, data_scale] (diffusion.data)


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


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of a run of ``total_steps``.

    A linear warm-up from lr / warmup to lr over the first ``warmup`` steps, then ``constant``,
    or a decay from lr at the end of the warm-up to ``lr_floor * lr`` at the last step:
    ``cosine`` (floor + (1 - floor) (1 + cos(pi p)) / 2, Loshchilov and Hutter 2017, without
    restarts) or ``linear`` (1 - (1 - floor) p), with p the fraction of the decay done. A pure
    function of the step, so a resumed run continues on the same curve.
    """
    lr = config.lr * min(1.0, (step + 1) / config.warmup) if config.warmup > 0 else config.lr
    if config.lr_schedule == "constant" or step < config.warmup:
        return lr
    progress = min(1.0, (step - config.warmup) / max(1, total_steps - 1 - config.warmup))
    if config.lr_schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif config.lr_schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}: allowed are "
                         f"{', '.join(map(repr, LR_SCHEDULES))}")
    return lr * (config.lr_floor + (1.0 - config.lr_floor) * decay)


def ema_decay_at(step: int, decay: float, warmup: float = 10.0) -> float:
    """The EMA decay of step ``step`` (0-based): min(decay, (1 + step) / (warmup + step)).

    With K = ``warmup``, (1 + s) / (K + s) ~ (1 - 1/s)^(K - 1): the EMA is then close to the
    power-function EMA of Karras et al. (2024, eq. 3) with exponent K - 2, an average over about
    the last 1/(K - 1) of the steps taken so far, whatever the run's length, until ``decay``
    caps it (at step (K decay - 1) / (1 - decay): 8991 for the defaults, 19 epochs of 469
    steps). K = 10 (improved-diffusion's choice) averages over the last ~11 %; smaller K averages
    longer, larger K follows the raw weights more closely.
    """
    return min(decay, (1 + step) / (warmup + step))


def ema_update(ema: nn.Module, net: nn.Module, decay: float, step: int,
               warmup: float = 10.0) -> None:
    """ema <- d * ema + (1 - d) * net with d = ``ema_decay_at(step, decay, warmup)``.

    The warm-up keeps short runs (a few hundred steps) from sampling with near-initial weights.
    """
    d = ema_decay_at(step, decay, warmup)
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


def drop_labels(labels: torch.Tensor, probability: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``labels`` with each replaced by ``NO_LABEL`` with ``probability`` (Ho and Salimans 2022,
    Algorithm 1: p_uncond), drawn from ``generator``."""
    if probability <= 0:
        return labels
    dropped = torch.rand(labels.shape, device=labels.device, generator=generator) < probability
    return torch.where(dropped, torch.full_like(labels, NO_LABEL), labels)


def denoising_loss(net: nn.Module, process: NoiseProcess, x0: torch.Tensor, t: torch.Tensor,
                   eps: torch.Tensor, precision: str = "auto",
                   min_snr_gamma: float = 0.0, labels: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the network's prediction at x_t and the process's target: eps (Ho eq. 14),
    x0 or v; each image's error weighted by ``process.min_snr_weight(t, min_snr_gamma)`` when
    ``min_snr_gamma`` > 0 (else alike). ``labels``: the digits of a conditional network."""
    x_t = process.q_sample(x0, t, eps)
    with autocast(x0.device, precision):
        prediction = (net(x_t, t.float() / process.n_T) if labels is None
                      else net(x_t, t.float() / process.n_T, labels))
    error = (prediction.float() - process.training_target(x0, eps, t)) ** 2
    if min_snr_gamma <= 0:
        return error.mean()
    weight = process.min_snr_weight(t, min_snr_gamma).to(error.dtype)
    return (error.flatten(1).mean(1) * weight).mean()


@torch.no_grad()
def heldout_loss(net: nn.Module, process: NoiseProcess, images: torch.Tensor, *, seed: int,
                 batch_size: int = 1000, precision: str = "auto", scale: float = 1.0,
                 labels: torch.Tensor | None = None) -> float:
    """Mean denoising loss on ``images`` (uint8, on the device) with noise fixed by ``seed``;
    a conditional network is given their ``labels`` (none dropped).

    The same t and eps every call, so values from successive epochs are comparable.
    """
    device = images.device
    process.to(device)
    generator = torch.Generator(device).manual_seed(seed)
    was_training = net.training
    net.eval()
    total = torch.zeros((), device=device)
    for start in range(0, images.shape[0], batch_size):
        x0 = to_model_range(images[start:start + batch_size], scale)
        t = torch.randint(1, process.n_T + 1, (x0.shape[0],), device=device, generator=generator)
        eps = process.noise(t, x0.shape, generator=generator)
        batch_labels = None if labels is None else labels[start:start + batch_size]
        total += denoising_loss(net, process, x0, t, eps, precision,
                                labels=batch_labels) * x0.shape[0]
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
          progress: Callable[[int, int], None] | None = None,
          train_labels: torch.Tensor | None = None,
          test_labels: torch.Tensor | None = None) -> TrainState:
    """Train ``state`` to ``config.epochs`` epochs, continuing from ``state.epoch``.

    ``train_images`` and ``test_images`` are uint8 (N, 28, 28) tensors already on the device,
    with their digits ``train_labels`` and ``test_labels`` for a conditional network (else None).
    After each epoch ``on_epoch(state, record)`` runs (grids, logging), then
    ``on_checkpoint(state)``, which should save ``state.state_dict()`` so a killed run can resume.
    ``progress(step_in_epoch, steps_per_epoch)`` is called every step for progress bars.

    Under a process group (torchrun) every process calls this with the same arguments; the
    callbacks then run on rank 0 only, and the others wait for them.
    """
    device = train_images.device
    process.to(device)
    n = train_images.shape[0]
    world = distributed.world()
    # Each process takes every world_size-th index of the shared permutation; wrapping around
    # pads the epoch to a multiple of world_size, so all processes take the same steps.
    per_rank = math.ceil(n / world.world_size)
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    holdout = test_images[:config.holdout_subset] if config.holdout_subset else test_images
    # Labels as int64: NO_LABEL (-1) does not fit MNIST's uint8 labels.
    holdout_labels = None if test_labels is None else test_labels[:holdout.shape[0]].long()
    train_labels = None if train_labels is None else train_labels.long()
    total_steps = config.epochs * steps_per_epoch  # the length the lr schedule is fitted to
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
            x0 = to_model_range(train_images[index], config.data_scale)
            t = torch.randint(1, process.n_T + 1, (x0.shape[0],), device=device,
                              generator=generator)
            eps = process.noise(t, x0.shape, generator=generator)
            labels = (None if train_labels is None else
                      drop_labels(train_labels[index], config.label_drop, generator))
            loss = denoising_loss(model, process, x0, t, eps, config.precision,
                                  config.min_snr_gamma, labels)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:  # the global norm, computed on the device: no host sync
                nn.utils.clip_grad_norm_(state.net.parameters(), config.grad_clip, foreach=True)
            lr = learning_rate(state.step, total_steps, config)  # from the step: resumes exactly
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            state.optimizer.step()
            ema_update(state.ema, state.net, config.ema_decay, state.step, config.ema_warmup)
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
                                precision=config.precision, scale=config.data_scale,
                                labels=holdout_labels)
                   if world.is_main else 0.0)
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


# --- a whole run: per-epoch outputs and resume -----------------------------------------------
GRID_SEED_OFFSET = 2  # the grids' fixed noise comes from seed + 2 (seed + 1 is the held-out noise)


def write_log(records: list[EpochRecord], path: Path) -> None:
    """The per-epoch records as CSV (one column per ``EpochRecord`` field), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = [f.name for f in fields(EpochRecord)]
    writer.writerow(names)
    for record in records:
        row = asdict(record)
        writer.writerow([f"{row[n]:.6g}" if isinstance(row[n], float) else row[n] for n in names])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


class Checkpoint:
    """The resume state of a training run: one file, written atomically after every epoch.

    ``Checkpoint.keyed`` names the file after a digest of the run's params and of its input
    files, so a state is resumed only by a run of the same params on the same data. States of
    other params are left beside it (``others``): they resume if those params come back.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.name = self.path.stem.rsplit("-", 1)[0]

    @classmethod
    def keyed(cls, folder: Path | str, name: str, key: dict, files: Iterable[Path]) -> Checkpoint:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
        for path in sorted(files):
            digest.update(path.name.encode())
            digest.update(hashlib.md5(path.read_bytes()).digest())
        return cls(Path(folder) / f"{name}-{digest.hexdigest()[:16]}.pt")

    def load(self, device: torch.device | str = "cpu",
             warn: Callable[[str], None] = print) -> dict:
        """The saved state, or {} when there is none or it is unusable (said through ``warn``;
        training then starts over)."""
        if not self.path.exists():
            return {}
        try:
            return load_torch(self.path, map_location=device, expect=("epoch", "net", "ema"),
                              kind="resume state")
        except ModelFileError as error:
            warn(f"{self.name} ignores its resume state: {error}")
            return {}

    def saved_epoch(self) -> int:
        """The last epoch whose state is saved (0 if none)."""
        return self.load(warn=lambda message: None).get("epoch", 0)

    def save(self, state: TrainState, **extra) -> None:
        save_torch({**state.state_dict(), **extra}, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def others(self) -> list[Path]:
        """Resume states of the same name for other params or data."""
        return sorted(path for path in self.path.parent.glob(f"{glob.escape(self.name)}-*.pt")
                      if path != self.path)

    def report_others(self) -> str | None:
        """Where the resume states of other params are and how big, or None if there are none."""
        others = self.others()
        if not others:
            return None
        size = sum(path.stat().st_size for path in others) / 2**20
        return (f"{self.name}: {len(others)} resume state(s) of other params or data "
                f"({size:.1f} MiB) in {self.path.parent}: {', '.join(p.name for p in others)}; "
                "they resume if those params come back, delete them to free the space")


class TrainLoop:
    """A training run with its outputs: ``log.csv`` after every epoch and
    ``grids/epoch_NNN.png`` every ``config.grid_every`` epochs and after the last, both in
    ``out_dir``, then the resume state in ``checkpoint``.

    A run that finds a resume state continues from it and first rewrites the log and grids of
    the epochs already done (DVC removes a stage's outputs before running it again). The grids
    are drawn from the same fixed noise every time, so successive grids are comparable.
    ``extra`` holds the caller's values saved with the state (the stage keeps its MLflow run id
    there). Under torchrun only rank 0 writes files.
    """

    def __init__(self, net: nn.Module, process: NoiseProcess, config: TrainConfig,
                 device: torch.device, out_dir: Path | str, *, checkpoint: Checkpoint | None = None,
                 warn: Callable[[str], None] = print) -> None:
        self.process, self.config, self.device = process.to(device), config, device
        self.out_dir, self.checkpoint = Path(out_dir), checkpoint
        self.state = make_state(net, config, device)
        saved = checkpoint.load(device, warn) if checkpoint is not None else {}
        self.resumed = bool(saved)
        if saved:
            self.state.load_state_dict(saved)
        self.grids: dict[int, torch.Tensor] = {int(k): v for k, v in saved.get("grids", {}).items()}
        self.extra: dict = dict(saved.get("extra", {}))
        generator = torch.Generator(device).manual_seed(config.seed + GRID_SEED_OFFSET)
        self.grid_noise = process.prior((config.grid_size, 1, 28, 28), generator=generator)
        classes = getattr(net, "classes", 0)  # a conditional network's grid: 0, 1, ..., 9, 0, ...
        self.grid_labels = (torch.arange(config.grid_size, device=device) % classes
                            if classes else None)

    def grid_path(self, epoch: int) -> Path:
        return self.out_dir / "grids" / f"epoch_{epoch:03d}.png"

    def sample_grid(self) -> torch.Tensor:
        """The EMA weights' digits from the fixed grid noise, uint8 on the CPU."""
        generator = torch.Generator(self.device).manual_seed(self.config.seed + GRID_SEED_OFFSET + 1)
        x = sample(self.state.ema, self.process, self.grid_noise.shape[0], device=self.device,
                   generator=generator, x_T=self.grid_noise, precision=self.config.precision,
                   labels=self.grid_labels)
        return to_uint8(x, self.config.data_scale).cpu()

    def run(self, train_images: torch.Tensor, test_images: torch.Tensor, *,
            report: Callable[[EpochRecord, Path | None], None] | None = None,
            train_labels: torch.Tensor | None = None,
            test_labels: torch.Tensor | None = None) -> TrainState:
        """Train to ``config.epochs`` (labels: for a conditional network, as in ``train``);
        ``report(record, grid file or None)`` runs after each epoch's files are written and
        before its state is saved."""
        if distributed.world().is_main:
            for epoch, images in self.grids.items():
                save_grid(images, self.grid_path(epoch))
            write_log(self.state.log, self.out_dir / "log.csv")

        def epoch_done(state: TrainState, record: EpochRecord) -> None:
            write_log(state.log, self.out_dir / "log.csv")
            grid = None
            if record.epoch % self.config.grid_every == 0 or record.epoch == self.config.epochs:
                self.grids[record.epoch] = self.sample_grid()
                grid = self.grid_path(record.epoch)
                save_grid(self.grids[record.epoch], grid)
            if report is not None:
                report(record, grid)

        def save_state(state: TrainState) -> None:
            if self.checkpoint is not None:
                self.checkpoint.save(state, extra=self.extra,
                                     grids={str(k): v for k, v in self.grids.items()})

        return train(self.state, self.process, train_images, test_images, self.config,
                     on_epoch=epoch_done, on_checkpoint=save_state, train_labels=train_labels,
                     test_labels=test_labels)
