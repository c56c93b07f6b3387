"""A trained model: the network's weights, the noise process and the config that made them.

The model file (``models/<name>/model.pt``) is a plain dict of tensors and values:
``{"config": {...}, "ema": state_dict, "net": state_dict}``. It loads with
``torch.load(weights_only=True)``, so a file carrying pickled code is refused.
``DiffusionModel`` wraps the EMA weights with the process for sampling and denoising.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffusion.data import to_uint8
from diffusion.io import load_torch, save_torch
from diffusion.network import DenoiserCNN
from diffusion.process import NoiseProcess, make_process
from diffusion.sampling import sample


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_model(path: Path | str, net: nn.Module, ema: nn.Module, process: NoiseProcess,
               config: dict) -> None:
    """Write the model file atomically. ``config`` must hold ``net`` (DenoiserCNN kwargs)."""
    save_torch({
        "config": {**config, "process": process.config()},
        "ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
        "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }, path)


@dataclass
class DiffusionModel:
    """EMA weights of a trained denoiser with its noise process, ready to sample."""

    net: DenoiserCNN
    process: NoiseProcess
    config: dict

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def sample(self, n: int, *, steps: int | None = None, sampler: str = "ancestral",
               eta: float = 1.0, seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
        """``n`` generated digits as uint8 (n, 28, 28), reproducible from ``seed``."""
        generator = torch.Generator(self.device).manual_seed(seed)
        x = sample(self.net, self.process, n, steps=steps, sampler=sampler, eta=eta,
                   device=self.device, generator=generator, batch_size=batch_size)
        return to_uint8(x).cpu()

    @torch.no_grad()
    def predict_noise(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The network's eps estimate for x_t (float (N, 1, 28, 28), model range) at timestep t."""
        x_t = x_t.to(self.device, torch.float32)
        t = torch.as_tensor(t, device=self.device).expand(x_t.shape[0])
        return self.net(x_t, t.float() / self.process.n_T).float()

    @torch.no_grad()
    def denoise(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """One-step estimate of the clean image x0 from x_t (Ho et al. 2020, eq. 15)."""
        t = torch.as_tensor(t, device=self.device).expand(x_t.shape[0])
        return self.process.predict_x0(x_t.to(self.device, torch.float32), t,
                                       self.predict_noise(x_t, t))


def load(path: Path | str, device: torch.device | str | None = None,
         weights: str = "ema") -> DiffusionModel:
    """Load a model file written by the train stage; ``weights`` is "ema" (default) or "net"."""
    if weights not in ("ema", "net"):
        raise ValueError(f"weights = {weights!r} is not allowed: use 'ema' or 'net'")
    device = torch.device(device) if device is not None else default_device()
    state = load_torch(path)
    config = state["config"]
    net = DenoiserCNN(tuple(config["net"]["hidden"]), config["net"]["activation"])
    net.load_state_dict(state[weights])
    return DiffusionModel(net.to(device).eval(), make_process(config["process"]), config)
