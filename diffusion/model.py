"""A trained model: the network's weights, the noise process and the config that made them.

The model file (``models/<name>/model.pt``) is a plain dict of tensors and values:
``{"config": {...}, "ema": state_dict, "net": state_dict}``. It loads with
``torch.load(weights_only=True)``, so a file carrying pickled code is refused.
``DiffusionModel`` wraps the EMA weights with the process for sampling and denoising. It is an
``nn.Module`` whose ``forward(x_t, t)`` predicts the noise, so MLflow's PyTorch flavour can log
it whole (``mlflow.pytorch.load_model`` gives back an object that samples); ``load_from_mlflow``
reads the weights-only copy logged next to it instead, without unpickling code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from diffusion.data import default_device, to_model_range, to_uint8
from diffusion.io import load_torch, save_torch
from diffusion.network import NO_LABEL, make_network, resolve_precision
from diffusion.process import NoiseProcess, make_process
from diffusion.sampling import predict, sample


def save_model(path: Path | str, net: nn.Module, ema: nn.Module, process: NoiseProcess,
               config: dict) -> None:
    """Write the model file atomically. ``config`` must hold ``net`` (DenoiserCNN kwargs)."""
    save_torch({
        "config": {**config, "process": process.config()},
        "ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
        "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }, path)


class DiffusionModel(nn.Module):
    """A trained denoiser (its EMA weights) with its noise process, ready to sample.

    Images in model range are float (N, 1, 28, 28) in [-1, 1]; timesteps t run from 0 (clean)
    to ``process.n_T`` and are given as an int (same t for every image) or a tensor (N,).
    ``forward(x_t, t)`` is the network's noise estimate eps_theta(x_t, t), computed in
    ``precision`` ("auto", "bf16" or "fp32"; see ``diffusion.network.resolve_precision``).
    The process is a submodule: ``.to(device)`` moves its schedules with the weights.
    A class-conditional model (``classes`` = 10) takes a ``digit`` and a guidance weight.
    """

    def __init__(self, net: nn.Module, process: NoiseProcess, config: dict | None = None,
                 precision: str = "auto") -> None:
        super().__init__()
        resolve_precision(precision, "cpu")  # reject an unknown value here, not at first use
        self.net = net
        self.process = process
        self.config = dict(config or {})
        self.precision = precision
        self.scale = float(self.config.get("data_scale", 1.0))  # images in [-scale, scale]

    @property
    def device(self) -> torch.device:
        """The device the network's weights are on."""
        return next(self.net.parameters()).device

    @property
    def classes(self) -> int:
        """10 for a model conditioned on the digit, 0 for an unconditional one."""
        return getattr(self.net, "classes", 0)

    def labels(self, digit: int | Sequence[int] | None, n: int,
               guidance: float = 0.0) -> torch.Tensor | None:
        """The label of each of ``n`` images: ``digit`` for all, a list of digits in turn (equal
        numbers), or None (unconditional); ValueError (one line) for what this model cannot do."""
        if guidance < 0:
            raise ValueError(f"guidance = {guidance!r} is not allowed: must be a number >= 0")
        if digit is None:
            if guidance > 0:
                raise ValueError(f"guidance = {guidance!r} needs a digit: give digit=0..9")
            return None
        if not self.classes:
            raise ValueError(f"digit = {digit!r} is not allowed: this model is unconditional "
                             "(trained with net.classes = 0); train with net.classes = 10")
        digits = [digit] if isinstance(digit, int) else list(digit)
        if not digits or any(not isinstance(d, int) or not 0 <= d < self.classes for d in digits):
            raise ValueError(f"digit = {digit!r} is not allowed: must be a digit 0..{self.classes - 1} "
                             "or a non-empty list of them")
        return torch.tensor(digits, device=self.device).repeat(n // len(digits) + 1)[:n]

    def _timesteps(self, t: int | torch.Tensor, n: int) -> torch.Tensor:
        """``t`` as a long tensor (n,) on the model's device, checked against 0..n_T."""
        t = torch.as_tensor(t, device=self.device).long().expand(n)
        if n and (t.min() < 0 or t.max() > self.process.n_T):
            raise ValueError(f"timestep t = {t.min().item()}..{t.max().item()} is not allowed: "
                             f"must be between 0 and n_T = {self.process.n_T}")
        return t

    def forward(self, x_t: torch.Tensor, t: int | torch.Tensor, digit: int | None = None,
                guidance: float = 0.0) -> torch.Tensor:
        """eps_theta(x_t, t): the noise estimate, float (N, 1, 28, 28), whatever the network's
        target (``NoiseProcess.eps_and_x0``); of a conditional model, for ``digit`` (None or
        -1: unconditional) with classifier-free ``guidance``."""
        return self._estimates(x_t, t, digit, guidance)[0]

    def _estimates(self, x_t: torch.Tensor, t: int | torch.Tensor, digit: int | None = None,
                   guidance: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_hat, x0_hat) at (x_t, t), from the network's prediction of its target."""
        t = self._timesteps(t, x_t.shape[0])
        x_t = x_t.to(self.device, torch.float32)
        digit = None if digit == NO_LABEL else digit
        labels = self.labels(digit, x_t.shape[0], guidance)
        prediction = predict(self.net, x_t, t.float() / self.process.n_T, labels, guidance,
                             self.precision)
        return self.process.eps_and_x0(x_t, t, prediction)

    @torch.no_grad()
    def sample(self, n: int, *, steps: int | None = None, sampler: str = "ancestral",
               eta: float = 1.0, seed: int = 0, batch_size: int | None = None,
               clip_x0: bool = False, prior: str = "exact",
               digit: int | Sequence[int] | None = None, guidance: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` generated digits as uint8 (n, 28, 28) on the CPU, reproducible from ``seed``.

        ``sampler`` is "ancestral" (Ho et al. 2020, Algorithm 2) or "ddim" (Song et al. 2021,
        eq. 12, with ``eta``); ``steps`` (default n_T) evenly spaced timesteps are used;
        ``clip_x0`` clips the x0 estimate of every step to the data range and ``prior`` picks the
        start (``diffusion.sampling.sample``). A conditional model draws ``digit`` (one digit,
        or a list taken in turn), with classifier-free ``guidance`` w >= 0:
        ``model.sample(20, digit=7, guidance=2.0)``. A ``generator`` (on the model's device) is
        drawn from in place of one seeded with ``seed``: batches drawn one call at a time from
        one generator are the images one call with that ``batch_size`` draws (the sweep's
        resume within a cell rests on it).
        """
        labels = self.labels(digit, n, guidance)
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(seed)
        x = sample(self.net, self.process, n, steps=steps, sampler=sampler, eta=eta,
                   device=self.device, generator=generator, batch_size=batch_size,
                   precision=self.precision, clip_x0=clip_x0, data_scale=self.scale, prior=prior,
                   labels=labels, guidance=guidance)
        return to_uint8(x, self.scale).cpu()

    @torch.no_grad()
    def denoise(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """One-step estimate of the clean image x0 from x_t (Ho et al. 2020, eq. 15, for an eps
        network: x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_bar_t))."""
        return self._estimates(x_t, t)[1]

    @torch.no_grad()
    def corrupt(self, x0: torch.Tensor, t: int | torch.Tensor, *, seed: int = 0) -> torch.Tensor:
        """x_t ~ q(x_t | x0) = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. eq. 4),
        with this model's noise eps (Gaussian for DDPM, centred Gamma for DDGM).

        ``x0`` is uint8 MNIST digits (N, 28, 28) or float (N, 1, 28, 28) in model range; the
        result is float (N, 1, 28, 28) in model range, reproducible from ``seed``.
        """
        if x0.dtype == torch.uint8:
            x0 = to_model_range(x0, self.scale)
        x0 = x0.to(self.device, torch.float32)
        t = self._timesteps(t, x0.shape[0])
        generator = torch.Generator(self.device).manual_seed(seed)
        return self.process.corrupt(x0, t, generator=generator)[0]


def load(path: Path | str, device: torch.device | str | None = None,
         weights: str = "ema", precision: str = "auto") -> DiffusionModel:
    """Load a model file written by the train stage; ``weights`` is "ema" (default) or "net",
    ``precision`` the arithmetic the network runs in from now on (not the one it trained in,
    which the file's config records as ``precision``)."""
    if weights not in ("ema", "net"):
        raise ValueError(f"weights = {weights!r} is not allowed: use 'ema' or 'net'")
    device = torch.device(device) if device is not None else default_device()
    state = load_torch(path, expect=("config", "ema", "net"), kind="model file of the train stage")
    config = state["config"]
    net = make_network(config["net"])
    net.load_state_dict(state[weights])
    return DiffusionModel(net, make_process(config["process"]), config, precision).to(device).eval()


# Where the MLflow model directory logged by the train stage keeps the weights-only model file
# (passed as an extra file to mlflow.pytorch.log_model).
MLFLOW_MODEL_FILE = "extra_files/model.pt"


def load_from_mlflow(uri: str, device: torch.device | str | None = None,
                     tracking_uri: str | None = None) -> DiffusionModel:
    """Load a model logged to MLflow by the train stage, without unpickling code.

    ``uri`` is a train run's id (its model ``runs:/<id>/<model name>``), any MLflow model URI
    (``runs:/<id>/ddpm``, ``models:/ddpm/1`` or ``models:/ddpm/latest`` or ``models:/ddpm@newest`` from the registry,
    ``models:/<model id>``) or a local MLflow model folder. The store is ``tracking_uri``, else MLflow's default
    (``MLFLOW_TRACKING_URI`` or ``./mlflow.db``, the pipeline's store when run from the repo
    root). MLflow is imported only here.
    """
    import tempfile

    import mlflow

    uri = str(uri)
    missing = (f"{uri} holds no {MLFLOW_MODEL_FILE}: it is not a model logged by the train stage "
               "(mlflow.pytorch.load_model may still load it)")
    if Path(uri).is_dir():
        if not (Path(uri) / MLFLOW_MODEL_FILE).is_file():
            raise FileNotFoundError(missing)
        return load(Path(uri) / MLFLOW_MODEL_FILE, device=device)
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if ":/" not in uri:  # a run id: its model is named after the run's "model" tag
        uri = f"runs:/{uri}/{client.get_run(uri).data.tags.get('model', 'model')}"
    if uri.startswith("models:/"):
        # A registered model's version (models:/ddpm/1, models:/ddpm/latest) or alias
        # (models:/ddpm@newest), looked up in this store's registry (MLflow's own resolution
        # would ask the default registry, not ``tracking_uri``).
        name, _, alias = uri.removeprefix("models:/").partition("@")
        parts = name.split("/")
        if alias and len(parts) == 1:
            uri = client.get_model_version_download_uri(
                name, client.get_model_version_by_alias(name, alias).version)
        elif len(parts) == 2 and parts[1] == "latest":
            versions = client.search_model_versions(f"name = '{parts[0]}'")
            uri = client.get_model_version_download_uri(
                parts[0], str(max(int(v.version) for v in versions)))
        elif len(parts) == 2 and parts[1].isdigit():
            uri = client.get_model_version_download_uri(parts[0], parts[1])
    with tempfile.TemporaryDirectory() as folder:  # the file is read into memory, then removed
        if uri.startswith("runs:/"):  # fetch only the weights file, not the pickle and the code
            path = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{uri.rstrip('/')}/{MLFLOW_MODEL_FILE}", dst_path=folder,
                tracking_uri=tracking_uri))
        else:
            path = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=folder, tracking_uri=tracking_uri)) / MLFLOW_MODEL_FILE
            if not path.is_file():
                raise FileNotFoundError(missing)
        return load(path, device=device)
