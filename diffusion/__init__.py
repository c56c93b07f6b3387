"""DDPM and DDGM (Gamma-noise) diffusion models on MNIST: the public Python API.

    import diffusion
    model = diffusion.load("models/ddpm/model.pt")            # or diffusion.load_from_mlflow(run_id)
    images = model.sample(64, steps=50, sampler="ddim", eta=0.0, seed=0)   # uint8 (64, 28, 28)
    x_t = model.corrupt(digits, t=500, seed=0)                # forward process q(x_t | x0)
    x0_hat = model.denoise(x_t, t=500)                        # one-step estimate of x0

Importing this package loads torch but neither MLflow nor DVC; ``load_from_mlflow`` imports
MLflow when called. The submodules (``diffusion.process``, ``.sampling``, ``.training``, ...)
hold the rest.
"""

from diffusion.model import DiffusionModel, default_device, load, load_from_mlflow, save_model
from diffusion.network import DenoiserCNN
from diffusion.process import GammaProcess, GaussianProcess, NoiseProcess, make_process
from diffusion.sampling import sample

__all__ = [
    "DiffusionModel",   # trained network + noise process: sample, denoise, corrupt
    "load",             # a model file (models/<name>/model.pt) -> DiffusionModel
    "load_from_mlflow", # a run id or MLflow model URI -> DiffusionModel
    "save_model",       # write a model file from a network, its EMA copy and a process
    "DenoiserCNN",      # the eps-predicting CNN
    "NoiseProcess",     # base class: schedule, forward process, noise
    "GaussianProcess",  # DDPM
    "GammaProcess",     # DDGM
    "make_process",     # a process from its config dict
    "sample",           # ancestral / DDIM sampling of any network under any process
    "default_device",   # CUDA when available, else the CPU
]
