"""Image conversions between MNIST bytes and the models' range, sample grids, and the device.

MNIST lives as uint8 tensors (N, 28, 28). The models see float32 (N, 1, 28, 28) scaled to
[-scale, scale]: [-1, 1] (scale 1) as in Ho et al. (2020), section 3.3; the coursework template
used ToTensor then Normalize(0.5, 1.0), i.e. [-0.5, 0.5] (scale 0.5).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion.io import atomic_path


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_model_range(images: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [-scale, scale]."""
    x = images.unsqueeze(1).float() / 127.5 - 1.0
    return x if scale == 1.0 else x * scale


def to_uint8(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """float (N, 1, 28, 28) in [-scale, scale] -> uint8 (N, 28, 28), clipped and rounded."""
    x = x.squeeze(1).float()
    x = x if scale == 1.0 else x / scale
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def grid_image(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """uint8 (N, 28, 28) -> one uint8 (H, W) image of the N digits on a grid."""
    from torchvision.utils import make_grid  # imported here: torchvision takes ~1 s to import

    n = images.shape[0]
    nrow = nrow or max(1, round(n ** 0.5))
    grid = make_grid(images.unsqueeze(1).cpu(), nrow=nrow, padding=padding, pad_value=255)
    return grid[0]


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """Write uint8 (N, 28, 28) images as one PNG grid, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(grid_image(images, nrow).numpy(), mode="L").save(tmp, format="PNG")
