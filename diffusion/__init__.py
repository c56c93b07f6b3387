"""DDPM and DDGM (Gamma-noise) diffusion models on MNIST: the public Python API.

    import diffusion
    model = diffusion.load("models/ddpm/model.pt")            # or diffusion.load_from_mlflow(run_id)
    images = model.sample(64, steps=50, sampler="ddim", eta=0.0, seed=0)   # uint8 (64, 28, 28)
    x_t = model.corrupt(digits, t=500, seed=0)                # forward process q(x_t | x0)
    x0_hat = model.denoise(x_t, t=500)                        # one-step estimate of x0

The names below are imported on first use (PEP 562), so ``import diffusion.mnist`` runs the
MNIST reader alone, not the networks and samplers. Neither MLflow nor DVC is imported here;
``load_from_mlflow`` imports MLflow when called.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS = {
    "DiffusionModel": "model",    # trained network + noise process: sample, denoise, corrupt
    "load": "model",              # a model file (models/<name>/model.pt) -> DiffusionModel
    "load_from_mlflow": "model",  # a run id or MLflow model URI -> DiffusionModel
    "save_model": "model",        # write a model file from a network, its EMA copy and a process
    "default_device": "data",     # CUDA when available, else the CPU
    "DenoiserCNN": "network",     # the seed's CNN
    "UNet": "network",            # the small U-Net
    "NoiseProcess": "process",    # base class: schedule, forward process, noise
    "GaussianProcess": "process", # DDPM
    "GammaProcess": "process",    # DDGM
    "make_process": "process",    # a process from its config dict
    "sample": "sampling",         # ancestral / DDIM sampling of any network under any process
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusion' has no attribute {name!r}")
    return getattr(importlib.import_module(f"diffusion.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
