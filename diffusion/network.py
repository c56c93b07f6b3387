"""The denoisers, which predict their target (eps, x0 or v) from (x_t, t / n_T).

- ``DenoiserCNN``, the seed coursework's small CNN: each block is a 7x7 convolution, LayerNorm
  over the whole (C, 28, 28) feature map, and an activation. The timestep enters once, after
  the first block, as a sinusoidal encoding of t / n_T passed through a small MLP and added to
  every pixel of the first block's output (a transformer-style encoding, Vaswani et al. 2017,
  used as in Ho et al. 2020). A final 3x3 convolution maps back to one channel. It never
  down-samples: its receptive field is 27 pixels.
- ``UNet``, a small U-Net for 28 x 28 digits (Ronneberger et al. 2015, as Ho et al. 2020 use
  it): two resolutions (28 and 14), residual blocks with GroupNorm whose every block adds the
  time embedding, self-attention at the lower resolution, skip connections across.

Either network can be class-conditional (``classes`` = 10, params.yaml's ``net.classes``): a
learned embedding of the digit is added to the time embedding, where the timestep enters. The
label ``NO_LABEL`` (-1) has an embedding of its own, the unconditional model of classifier-free
guidance (Ho and Salimans 2022), trained on the labels dropped with probability
``train.label_drop``.

The networks know nothing of the noise process; ``make_network`` builds one from params.yaml's
``net`` section.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.options import ACTIVATIONS, CLASSES, NETWORKS, PRECISIONS

ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
assert tuple(ACTIVATION_MODULES) == ACTIVATIONS
# torch.cpu.get_capabilities() keys of instructions that compute bf16 products natively:
# AMX-BF16 tiles and AVX512-BF16 dot products on x86, BF16 (BFDOT/BFMMLA) and SVE-BF16 on ARM64.
# Without them oneDNN emulates bf16 by converting to float32, and autocast only adds the casts.
NATIVE_BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (so bf16 autocast is faster)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        return any(capabilities.get(feature) is True for feature in NATIVE_BF16_CPU_FEATURES)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The arithmetic the network runs in: "bf16" or "fp32".

    "auto" is bf16 where the device has native bf16 matrix support (CUDA GPUs, CPUs with
    AMX-BF16 / AVX512-BF16 / ARM BF16) and fp32 elsewhere; "bf16" and "fp32" force one.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision = {precision!r} is not allowed: use {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """The autocast context for the network: bf16 where ``resolve_precision`` says so, else off.

    Only the network's matmuls and convolutions run in bf16; the caller keeps x_t, the noise
    and the schedule coefficients in float32 (or float64), so precision never touches the maths
    of the noise process.
    """
    bf16 = resolve_precision(precision, device) == "bf16"
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


class ConvBlock(nn.Sequential):
    """Conv (same padding) -> LayerNorm over (C, H, W) -> activation."""

    def __init__(self, in_channels: int, out_channels: int, image_shape: tuple[int, int],
                 activation: type[nn.Module], kernel_size: int = 7) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.LayerNorm((out_channels, *image_shape)),
            activation(),
        )


class TimeEncoding(nn.Module):
    """Sinusoidal features of t in [0, 1] at geometric frequencies, then an MLP."""

    def __init__(self, out_channels: int, activation: type[nn.Module], n_frequencies: int = 16,
                 width: int = 128) -> None:
        super().__init__()
        # Frequencies 0 and 2*pi*1.5^i: from one cycle over the whole schedule to a few hundred.
        frequencies = [0.0] + [2 * math.pi * 1.5 ** i for i in range(n_frequencies - 1)]
        self.register_buffer("frequencies", torch.tensor(frequencies), persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * n_frequencies, width), activation(),
            nn.Linear(width, width), activation(),
            nn.Linear(width, width), activation(),
            nn.Linear(width, out_channels),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        phases = t[:, None] * self.frequencies[None, :]
        return self.mlp(torch.cat([phases.sin(), phases.cos() - 1.0], dim=1))


NO_LABEL = -1  # a conditional network's "no digit": the unconditional prediction


class LabelEmbedding(nn.Module):
    """A learned vector per digit and one more for ``NO_LABEL``, added to the time embedding.

    It starts at zero, so a conditional network starts as the unconditional one. A network with
    ``classes`` = 0 has none and accepts no labels.
    """

    def __init__(self, classes: int, width: int) -> None:
        super().__init__()
        self.classes = classes
        self.table = nn.Embedding(classes + 1, width) if classes else None
        if self.table is not None:
            nn.init.zeros_(self.table.weight)

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """``embedding`` plus the labels' vectors; ``labels`` None means NO_LABEL for all."""
        if self.table is None:
            if labels is not None:
                raise ValueError("this network is unconditional (net.classes = 0): it takes no labels")
            return embedding
        if labels is None:
            labels = torch.full(embedding.shape[:1], NO_LABEL, device=embedding.device)
        # No range check here (it would make the device wait every step): callers check digits.
        index = torch.where(labels == NO_LABEL, self.classes, labels.long())
        return embedding + self.table(index).to(embedding.dtype)


class DenoiserCNN(nn.Module):
    """eps_theta(x_t, t) for 1x28x28 images; ``t`` is the timestep divided by n_T."""

    def __init__(self, hidden: tuple[int, ...] = (16, 32, 32, 16), activation: str = "gelu",
                 in_channels: int = 1, image_shape: tuple[int, int] = (28, 28),
                 classes: int = 0) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("hidden must list at least one channel count")
        act = ACTIVATION_MODULES[activation]
        channels = [in_channels, *hidden]
        self.blocks = nn.ModuleList(
            ConvBlock(c_in, c_out, image_shape, act) for c_in, c_out in zip(channels, channels[1:])
        )
        self.head = nn.Conv2d(hidden[-1], in_channels, 3, padding=1)
        self.time_encoding = TimeEncoding(hidden[0], act)
        self.classes, self.label = classes, LabelEmbedding(classes, hidden[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        embedding = self.label(self.time_encoding(t), labels)
        h = self.blocks[0](x) + embedding[:, :, None, None]
        for block in self.blocks[1:]:
            h = block(h)
        return self.head(h)


class ResidualBlock(nn.Module):
    """GroupNorm -> act -> 3x3 conv, + the time embedding, GroupNorm -> act -> 3x3 conv, plus a
    (1x1-projected) skip: the residual block of Ho et al. (2020), appendix B."""

    def __init__(self, in_channels: int, out_channels: int, embedding: int,
                 activation: type[nn.Module], groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(math.gcd(groups, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(embedding, out_channels)
        self.norm2 = nn.GroupNorm(math.gcd(groups, out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                     else nn.Identity())
        self.act = activation()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x))) + self.time(embedding)[:, :, None, None]
        return self.skip(x) + self.conv2(self.act(self.norm2(h)))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, channels: int, heads: int = 4, groups: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(math.gcd(groups, channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        attended = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                                  v.transpose(-1, -2))
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """A small U-Net for 1 x 28 x 28 images; ``t`` is the timestep divided by n_T.

    ``channels`` gives one width per resolution, from 28 x 28 down: two widths use 28 and 14,
    three use 28, 14 and 7. Each resolution has ``blocks`` residual blocks on the way down and
    one more on the way up (the first of which takes the skip from the way down); two blocks
    sit at the lowest resolution, with self-attention between them if ``attention``. Attention
    at 7 x 7 attends over 49 positions, at 14 x 14 over 196: on a CPU its cost grows with the
    square of that. The output convolution starts at zero, so the untrained network predicts 0
    (improved-diffusion does the same).
    """

    def __init__(self, channels: tuple[int, ...], blocks: int, attention: bool, activation: str,
                 in_channels: int = 1, classes: int = 0) -> None:
        super().__init__()
        if not 2 <= len(channels) <= 3:
            raise ValueError(f"channels must give two or three widths (28, 14[, 7]), got {channels}")
        act, embedding = ACTIVATION_MODULES[activation], 4 * channels[0]
        self.time_encoding = TimeEncoding(embedding, act, width=embedding)
        self.classes, self.label = classes, LabelEmbedding(classes, embedding)
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        width = channels[0]
        for level, c in enumerate(channels):
            if level > 0:  # halve the resolution: 28 -> 14 -> 7
                self.downsample.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
            self.down.append(nn.ModuleList(
                ResidualBlock(width if i == 0 else c, c, embedding, act) for i in range(blocks)))
            width = c
        self.middle = nn.ModuleList([ResidualBlock(width, width, embedding, act),
                                     ResidualBlock(width, width, embedding, act)])
        self.attention = SelfAttention(width) if attention else nn.Identity()
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(channels))):
            c = channels[level]
            self.up.append(nn.ModuleList(ResidualBlock(width + c if i == 0 else c, c, embedding, act)
                                         for i in range(blocks + 1)))
            width = c
            if level > 0:  # double the resolution: 7 -> 14 -> 28
                self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                   nn.Conv2d(c, c, 3, padding=1)))
        self.head = nn.Sequential(nn.GroupNorm(math.gcd(8, width), width), act(),
                                  nn.Conv2d(width, in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.label(self.time_encoding(t), labels)
        h = self.stem(x)
        skips = []
        for level, blocks in enumerate(self.down):
            if level > 0:
                h = self.downsample[level - 1](h)
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
        h = self.attention(self.middle[0](h, emb))
        h = self.middle[1](h, emb)
        for level, blocks in enumerate(self.up):
            if level > 0:
                h = self.upsample[level - 1](h)
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
        return self.head(h)


def make_network(config: dict) -> nn.Module:
    """The network of params.yaml's ``net`` section (or a model file's copy of it): ``kind``
    ``cnn`` uses ``hidden`` and ``activation``; ``unet`` uses ``channels``, ``blocks``,
    ``attention`` and ``activation``; ``classes`` (default 0, unconditional) is either's. A
    section without ``kind`` is the seed's CNN."""
    kind, classes = config.get("kind", "cnn"), config.get("classes", 0)
    if classes not in CLASSES:
        raise ValueError(f"classes = {classes!r} is not allowed: must be one of "
                         f"{', '.join(map(str, CLASSES))}")
    if kind == "cnn":
        return DenoiserCNN(tuple(config["hidden"]), config["activation"], classes=classes)
    if kind == "unet":
        return UNet(tuple(config["channels"]), config["blocks"], config["attention"],
                    config["activation"], classes=classes)
    raise ValueError(f"unknown network {kind!r}: allowed are {', '.join(map(repr, NETWORKS))}")
