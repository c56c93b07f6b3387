"""The denoiser: the seed coursework's small CNN, which predicts eps from (x_t, t).

Each block is a 7x7 convolution, LayerNorm over the whole (C, 28, 28) feature map, and an
activation. The timestep enters once, after the first block, as a sinusoidal encoding of
t / n_T passed through a small MLP and added to every pixel of the first block's output
(a transformer-style encoding, Vaswani et al. 2017, used as in Ho et al. 2020). A final 3x3
convolution maps back to one channel. The network knows nothing of the noise process.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
PRECISIONS = ("auto", "bf16", "fp32")
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


class DenoiserCNN(nn.Module):
    """eps_theta(x_t, t) for 1x28x28 images; ``t`` is the timestep divided by n_T."""

    def __init__(self, hidden: tuple[int, ...] = (16, 32, 32, 16), activation: str = "gelu",
                 in_channels: int = 1, image_shape: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("hidden must list at least one channel count")
        act = ACTIVATIONS[activation]
        channels = [in_channels, *hidden]
        self.blocks = nn.ModuleList(
            ConvBlock(c_in, c_out, image_shape, act) for c_in, c_out in zip(channels, channels[1:])
        )
        self.head = nn.Conv2d(hidden[-1], in_channels, 3, padding=1)
        self.time_encoding = TimeEncoding(hidden[0], act)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](x) + self.time_encoding(t)[:, :, None, None]
        for block in self.blocks[1:]:
            h = block(h)
        return self.head(h)
