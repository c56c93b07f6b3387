"""Noise processes: the one place where DDPM and DDGM differ.

Both models share the forward corruption of Ho et al. (2020), eq. 4,

    x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps,

with a beta schedule (``linear``, Ho et al. section 4, or ``cosine``, Nichol and Dhariwal 2021
eq. 17) and a prediction target (``eps``, Ho et al. eq. 14; ``x0``; or ``v``, Salimans and Ho
2022). They differ only in the distribution of the standardised noise eps (mean 0, variance 1):

- ``GaussianProcess`` (DDPM, Ho et al. 2020): eps ~ N(0, I).
- ``GammaProcess`` (DDGM, Nachmani, San Roman and Wolf 2021, section 3): with
  theta_t = sqrt(alpha_bar_t) * theta_0, k_t = beta_t / (alpha_bar_t * theta_0^2) and
  k_bar_t = sum_{i<=t} k_i, the noise is the centred Gamma variable
  g_bar_t - k_bar_t * theta_t, g_bar_t ~ Gamma(shape k_bar_t, scale theta_t), scaled by
  1 / sqrt(1 - alpha_bar_t). Because k_bar_t * theta_t^2 = 1 - alpha_bar_t, this equals
  (G - k_bar_t) / sqrt(k_bar_t) with G ~ Gamma(k_bar_t, 1): unit variance, skewness
  2 / sqrt(k_bar_t).

The identity k_bar_t theta_t^2 = 1 - alpha_bar_t holds for any beta schedule (the sum of
beta_i / alpha_bar_i telescopes to 1 / alpha_bar_t - 1), so the Gamma noise is exact on the
cosine schedule too, within the theta_0 range ``check`` computes for it.

The samplers also draw their reverse-step noise through ``noise``: Gaussian noise for DDPM,
and for DDGM the standardised Gamma noise of the timestep being stepped to (the paper's
Algorithm 2). Timesteps run from 1 to n_T; index 0 of every schedule array is t = 0 (clean).

Targets: with a = sqrt(alpha_bar_t) and s = sqrt(1 - alpha_bar_t) (a^2 + s^2 = 1), the network
predicts eps, x0, or v = a eps - s x0, and ``eps_and_x0`` turns any of them into both
estimates: x0 = (x_t - s eps) / a and eps = (x_t - a x0) / s; from v, x0 = a x_t - s v and
eps = s x_t + a v. These hold for either noise law, which only changes the law of eps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from diffusion.options import GAMMA, GAUSSIAN, NOISES, SCHEDULES, TARGETS

# Limits within which the schedule's maths holds in the precisions used (see ``check``).
MIN_ALPHA_BAR = 1e-30     # alpha_bar_T below it: 1/sqrt(alpha_bar) of the x0 estimate leaves float32
MIN_FINAL_NOISE = 1e-3    # 1 - alpha_bar_T below it: x_T is the image, not noise
MIN_GAMMA_SHAPE = 1e-3    # k_bar_1 below it: Gamma draws lose their mean and variance (float64)
MAX_GAMMA_SHAPE = 1e16    # k_bar_T above it: (G - k_bar) in float64 steps by 2^-52 sqrt(k_bar) > 2e-8,
                          # within a few float32 spacings of eps near 1 (1.2e-7): draws collide
COSINE_OFFSET = 0.008     # Nichol and Dhariwal (2021), section 3.2: s, so beta_1 is not tiny
MAX_BETA = 0.999          # ... and the clipping of beta_t near t = T, where alpha_bar -> 0


def beta_schedule(kind: str, n_T: int, betas: Sequence[float] = (1e-4, 0.02)) -> torch.Tensor:
    """beta_0..beta_T in float64 (beta_0 = 0: t = 0 is the clean image).

    ``linear``: from beta_1 to beta_T = ``betas`` (Ho et al. 2020, section 4). ``cosine``:
    alpha_bar_t = f(t) / f(0) with f(t) = cos((t / T + s) / (1 + s) * pi / 2)^2 and
    beta_t = min(1 - alpha_bar_t / alpha_bar_{t-1}, 0.999) (Nichol and Dhariwal 2021, eq. 17);
    ``betas`` are not used.
    """
    beta = torch.zeros(n_T + 1, dtype=torch.float64)
    if kind == "linear":
        beta[1:] = torch.linspace(betas[0], betas[1], n_T, dtype=torch.float64)
    elif kind == "cosine":
        t = torch.arange(n_T + 1, dtype=torch.float64)
        f = torch.cos((t / n_T + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        beta[1:] = (1.0 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    else:
        raise ValueError(f"unknown schedule {kind!r}: allowed are {', '.join(map(repr, SCHEDULES))}")
    return beta


def timesteps_at(fractions: Sequence[float], n_T: int, lowest: int = 0) -> list[int]:
    """The timesteps round(f * n_T) of fractions f in [0, 1] of a schedule, none below
    ``lowest``, in the given order with repeats dropped.

    Params name timesteps as fractions so that one value fits every n_T: 0.5 is t = 500 of
    1000 steps and t = 5 of 10.
    """
    for fraction in fractions:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction of n_T = {fraction!r} is not allowed: must be in [0, 1]")
    return list(dict.fromkeys(max(lowest, round(f * n_T)) for f in fractions))


class ScheduleError(ValueError):
    """A schedule whose noise process cannot be computed exactly; the message says why."""


class NoiseProcess(nn.Module):
    """A diffusion process over ``n_T`` steps: its beta schedule, its prediction target, and
    (in subclasses) its noise law.

    Subclasses define only ``noise``. The schedules are float64 buffers indexed by t = 0..n_T,
    so ``.to(device)`` moves them with the module and they are copied to the device once, not
    every step (a host-to-device copy per step would make the host wait for the GPU). A process
    must be on the device of the timesteps it is given.
    """

    name: str = ""

    def __init__(self, betas: tuple[float, float], n_T: int, *, schedule: str = "linear",
                 target: str = "eps") -> None:
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}: allowed are {', '.join(map(repr, TARGETS))}")
        self.n_T, self.schedule, self.target = int(n_T), schedule, target
        self.beta_range = (float(betas[0]), float(betas[1]))
        beta = beta_schedule(schedule, self.n_T, self.beta_range)
        self.register_buffer("beta", beta, persistent=False)
        self.register_buffer("alpha", 1.0 - beta, persistent=False)
        self.register_buffer("alpha_bar", torch.cumprod(1.0 - beta, dim=0),  # alpha_bar_0 = 1
                             persistent=False)
        self.check()

    def check(self) -> None:
        """Raise ``ScheduleError`` unless x_T holds noise and x0 can be estimated from x_t."""
        alpha_bar_T = float(self.alpha_bar[self.n_T])
        if not alpha_bar_T >= MIN_ALPHA_BAR:
            raise ScheduleError(
                f"alpha_bar_T = {alpha_bar_T:.3g} is below {MIN_ALPHA_BAR:g}: the x0 estimate "
                "x_t / sqrt(alpha_bar_t) overflows float32; use smaller betas or fewer steps")
        if not 1.0 - alpha_bar_T >= MIN_FINAL_NOISE:
            raise ScheduleError(
                f"1 - alpha_bar_T = {1.0 - alpha_bar_T:.3g} is below {MIN_FINAL_NOISE:g}: x_T is "
                "almost the clean image, with no noise to start sampling from; use larger betas "
                "or more steps")

    @property
    def device(self) -> torch.device:
        return self.alpha_bar.device

    # --- the part that differs between processes -------------------------------------------
    def noise(self, t: torch.Tensor, shape: torch.Size | tuple[int, ...], *,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Standardised noise eps (mean 0, variance 1), float32 on ``t``'s device, for timesteps
        ``t`` (one per batch row)."""
        raise NotImplementedError

    # --- shared maths --------------------------------------------------------------------------
    def _a_s(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a = sqrt(alpha_bar_t) and s = sqrt(1 - alpha_bar_t), taken in float64 (as the samplers'
        coefficient tables are) and cast to ``like``'s dtype, shaped to broadcast over its rows."""
        alpha_bar = self.alpha_bar[t].view(-1, *[1] * (like.dim() - 1))
        return alpha_bar.sqrt().to(like.dtype), (1.0 - alpha_bar).sqrt().to(like.dtype)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Forward corruption x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho eq. 4)."""
        a, s = self._a_s(t, x0)
        return a * x0 + s * eps

    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, *,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A draw of x_t ~ q(x_t | x0) with this process's noise: (x_t, the noise eps used)."""
        eps = self.noise(t, x0.shape, generator=generator)
        return self.q_sample(x0, t, eps), eps

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to predict from x_t = a x0 + s eps: eps (Ho eq. 14; DDGM
        Algorithm 1), x0, or v = a eps - s x0 (Salimans and Ho 2022, section 4)."""
        if self.target == "eps":
            return eps
        if self.target == "x0":
            return x0
        a, s = self._a_s(t, x0)
        return a * eps - s * x0

    def eps_and_x0(self, x_t: torch.Tensor, t: torch.Tensor,
                   prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's ``prediction`` of the target at (x_t, t) as (eps_hat, x0_hat), the two
        estimates every sampler step and the x0 estimate use (see the module doc)."""
        a, s = self._a_s(t, x_t)
        if self.target == "eps":
            return prediction, (x_t - s * prediction) / a
        if self.target == "x0":
            return (x_t - a * prediction) / s, prediction
        return s * x_t + a * prediction, a * x_t - s * prediction

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """The signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of x_t, float64: the noise
        has unit variance under either law, so this is the same for Gaussian and Gamma noise."""
        alpha_bar = self.alpha_bar[t]
        return alpha_bar / (1.0 - alpha_bar)

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Per-image weights of the target's squared error for min-SNR-gamma training (Hang et
        al. 2023): the loss becomes min(SNR_t, gamma) ||x0_hat - x0||^2 for every target.

        From x_t = a x0 + s eps (a^2 + s^2 = 1, SNR = a^2 / s^2), the x0 error of each target's
        prediction is x0_hat - x0 = -(s / a)(eps_hat - eps) = -s (v_hat - v), so
        ||x0_hat - x0||^2 = ||eps_hat - eps||^2 / SNR = ||v_hat - v||^2 / (1 + SNR), and the
        weights on the target's own error are min(SNR, gamma) / SNR = min(1, gamma / SNR) (eps),
        min(SNR, gamma) (x0) and min(SNR, gamma) / (SNR + 1) (v). The identities are algebra on
        eq. 4 alone, so they hold for Gamma noise too: the weighting moves the loss's emphasis
        away from low-noise steps (SNR > gamma) in the same way, whichever law drew eps; what
        the weighting cannot change is that the eps_hat which minimises the loss is the
        conditional mean of a skewed variable under Gamma noise.
        """
        snr = self.snr(t)
        clipped = snr.clamp(max=gamma)
        if self.target == "eps":
            weight = clipped / snr
        elif self.target == "x0":
            weight = clipped
        else:
            weight = clipped / (snr + 1.0)
        return weight.float()

    def prior(self, shape: tuple[int, ...], *,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T drawn from the forward marginal with x0 = 0: sqrt(1 - alpha_bar_T) eps_T.

        For DDGM this is the centred Gamma(k_bar_T, theta_T) start of Algorithm 2; for DDPM it is
        N(0, (1 - alpha_bar_T) I), within 3e-5 of Ho's N(0, I) for the default schedule.
        """
        t = torch.full((shape[0],), self.n_T, dtype=torch.long, device=self.device)
        scale = float((1.0 - self.alpha_bar[self.n_T]).sqrt())
        return scale * self.noise(t, shape, generator=generator)

    def config(self) -> dict:
        """Plain values that rebuild this process with ``make_process``: a params.yaml model
        section."""
        return {"noise": self.name, "schedule": self.schedule, "target": self.target,
                "betas": list(self.beta_range), "n_T": self.n_T}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.config().items())


class GaussianProcess(NoiseProcess):
    """DDPM: eps ~ N(0, I)."""

    name = GAUSSIAN

    def noise(self, t, shape, *, generator=None):
        return torch.randn(shape, device=t.device, generator=generator)


class GammaProcess(NoiseProcess):
    """DDGM: eps = (G - k_bar_t) / sqrt(k_bar_t), G ~ Gamma(k_bar_t, 1) (Nachmani et al. 2021)."""

    name = GAMMA

    def __init__(self, betas: tuple[float, float], n_T: int, theta_0: float, *,
                 schedule: str = "linear", target: str = "eps") -> None:
        self.theta_0 = float(theta_0)
        super().__init__(betas, n_T, schedule=schedule, target=target)
        # DDGM section 3: k_t = beta_t / (alpha_bar_t theta_0^2), theta_t = sqrt(alpha_bar_t) theta_0.
        k_bar = self._k_bar_per_unit_theta() / self.theta_0 ** 2  # k_bar_0 = 0: no noise at t = 0
        self.register_buffer("k_bar", k_bar, persistent=False)
        self.register_buffer("theta", self.alpha_bar.sqrt() * self.theta_0, persistent=False)

    def _k_bar_per_unit_theta(self) -> torch.Tensor:
        """k_bar_t for theta_0 = 1; k_bar_t scales as 1 / theta_0^2."""
        return torch.cumsum(self.beta / self.alpha_bar, dim=0)

    def theta_0_range(self) -> tuple[float, float]:
        """The theta_0 for which every Gamma shape k_bar_1..k_bar_T lies within
        [MIN_GAMMA_SHAPE, MAX_GAMMA_SHAPE], where the float64 draw and centring are exact."""
        k_bar = self._k_bar_per_unit_theta()
        return (float(k_bar[self.n_T] / MAX_GAMMA_SHAPE) ** 0.5,
                float(k_bar[1] / MIN_GAMMA_SHAPE) ** 0.5)

    def check(self) -> None:
        super().check()
        low, high = self.theta_0_range()
        if not low <= self.theta_0 <= high:
            raise ScheduleError(
                f"theta_0 = {self.theta_0:g} is outside [{low:.3g}, {high:.3g}] for this schedule: "
                f"the Gamma shapes k_bar_t = k_bar_t(theta_0 = 1) / theta_0^2 must lie within "
                f"[{MIN_GAMMA_SHAPE:g}, {MAX_GAMMA_SHAPE:g}] for the noise to be drawn exactly")

    def noise(self, t, shape, *, generator=None):
        # k_bar_T reaches ~2.5e10 for theta_0 = 1e-3: in float32 the mean subtraction G - k_bar
        # would quantise eps to steps of ~0.015 std. In float64 the draw and the subtraction keep
        # ~1e-11 resolution, so eps is exact for float32 use. Drawn on t's device: no host
        # round trip.
        k_bar = self.k_bar[t].double().view(-1, *[1] * (len(shape) - 1)).expand(shape)
        k_bar = torch.where(k_bar > 0, k_bar, torch.ones_like(k_bar))  # t = 0 has no noise
        gamma = torch._standard_gamma(k_bar.contiguous(), generator=generator)
        return ((gamma - k_bar) / k_bar.sqrt()).to(torch.float32)

    def config(self) -> dict:
        return {**super().config(), "theta_0": self.theta_0}


def guided(conditional: torch.Tensor, unconditional: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance (Ho and Salimans 2022, eq. 6) on the network's target:
    (1 + w) f(x_t, t, c) - w f(x_t, t, no label), with f the network's prediction (eps, x0 or v)
    and w = ``weight`` >= 0; w = 0 is the plain conditional prediction.

    Every target is an affine function of eps at fixed (x_t, t), the same for both predictions
    (x0 = (x_t - s eps) / a and v = (eps - s x_t) / a, as a^2 + s^2 = 1), and the mix's weights
    sum to 1, so mixing the targets and then converting once (``NoiseProcess.eps_and_x0``)
    gives the same eps_hat as mixing eps_hat: the guidance is the same for every target.

    Under Gaussian noise, -eps_hat / s estimates the score of x_t, and the mix is the score of
    p(x_t | c) p(c | x_t)^w: sampling leans towards images the implicit classifier finds typical
    of c. Under Gamma noise eps_hat is still the conditional mean E[eps | x_t, c] (the loss is a
    squared error), but the score of x_t is no longer -E[eps | x_t] / s (Tweedie's formula needs
    Gaussian noise), so the mix is an extrapolation of conditional means away from the
    unconditional one, not an exact tilt of the distribution; w = 0 stays exactly the
    conditional model.
    """
    if weight == 0:
        return conditional
    return conditional + weight * (conditional - unconditional)


def make_process(config: dict) -> NoiseProcess:
    """Build a process from a params.yaml model section or ``NoiseProcess.config()`` output:
    ``{"noise": "gaussian" | "gamma", "schedule": "linear" | "cosine", "target": "eps" | "x0" |
    "v", "betas": [beta_1, beta_T], "n_T": ..., "theta_0": ...}`` (``theta_0`` for Gamma noise
    only; schedule and target default to the seed's linear and eps)."""
    kind = config.get("noise")
    options = {"schedule": config.get("schedule", "linear"), "target": config.get("target", "eps")}
    if kind == GAUSSIAN:
        return GaussianProcess(tuple(config["betas"]), config["n_T"], **options)
    if kind == GAMMA:
        return GammaProcess(tuple(config["betas"]), config["n_T"], config["theta_0"], **options)
    raise ValueError(f"unknown noise {kind!r}: allowed are {', '.join(map(repr, NOISES))}")
