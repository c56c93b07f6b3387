"""Samplers: ancestral (Ho et al. 2020, Algorithm 2) and DDIM (Song et al. 2021, eq. 12), for any
noise process and any number of steps.

Every sampler here is one update on an evenly spaced sub-sequence tau_1 < ... < tau_S = n_T of
timesteps (tau_0 = 0 is the clean image):

    x_{tau_{i-1}} = a_i x_{tau_i} + b_i eps_theta(x_{tau_i}, tau_i) + c_i z_i,

where z_i = process.noise(tau_{i-1}) is the process's standardised noise: Gaussian for DDPM, the
centred, scaled Gamma noise of index tau_{i-1} for DDGM (DDGM paper, Algorithms 2 and 4). The
samplers differ only in the coefficient tables (a, b, c), computed in float64:

- ancestral, on the respaced schedule beta'_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}}
  (Nichol and Dhariwal 2021, section 4): a = 1/sqrt(alpha'_i),
  b = -beta'_i / (sqrt(alpha'_i) sqrt(1 - alpha_bar_{tau_i})), c = sqrt(beta'_i) (sigma^2 = beta,
  Ho et al. section 3.2), and no noise on the last step. With S = n_T this is Ho's Algorithm 2.
- DDIM with eta: x_prev = sqrt(alpha_bar_prev) x0_hat + c1 z + c2 eps_hat, where
  x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t),
  c1 = eta sqrt((1 - alpha_bar_t/alpha_bar_prev)(1 - alpha_bar_prev)/(1 - alpha_bar_t)) and
  c2 = sqrt(1 - alpha_bar_prev - c1^2). eta = 0 is deterministic; eta = 1 has the posterior
  variance beta_tilde.

Clipping (``clip_x0``): as x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t), every
update can be written x_prev = p_i x0_hat + q_i x_t + c_i z with p = -b sqrt(alpha_bar_t) /
sqrt(1 - alpha_bar_t) and q = a + b / sqrt(1 - alpha_bar_t). With x0_hat clipped to the data
range [-1, 1] first, this is the posterior mean of Ho et al. (eq. 7) at the clipped estimate for
the ancestral sampler (improved-diffusion's ``clip_denoised``) and DDIM with eps re-derived from
the clipped estimate (diffusers' ``clip_sample``). Unclipped, it is the same update.

Conditional sampling (``labels``) changes only eps_theta: the network's prediction for the
requested digits, or with guidance w > 0 the classifier-free mix of the conditional and
unconditional predictions (``diffusion.process.guided``), in one batch of twice the size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from diffusion.network import NO_LABEL, autocast
from diffusion.options import PRIORS, SAMPLERS
from diffusion.process import NoiseProcess, guided


def timestep_sequence(n_T: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from 1 to n_T (both included when steps > 1), ascending."""
    if not 1 <= steps <= n_T:
        raise ValueError(f"steps = {steps} is not allowed: must be between 1 and n_T = {n_T}")
    if steps == 1:
        return [n_T]
    # Spacing (n_T - 1)/(steps - 1) >= 1, so the rounded values stay strictly increasing.
    return torch.linspace(1, n_T, steps, dtype=torch.float64).round().long().tolist()


def steps_within(steps: int, n_T: int) -> int:
    """A step count for a schedule of n_T steps: more than n_T means all n_T (said by callers)."""
    if steps < 1:
        raise ValueError(f"steps = {steps} is not allowed: must be at least 1")
    return min(steps, n_T)


@dataclass
class SamplerPlan:
    """The update coefficients of one sampler run, from tau_S = n_T down to tau_1."""

    timesteps: list[int]       # tau_i for each update, descending
    previous: list[int]        # tau_{i-1} for each update (0 on the last)
    a: torch.Tensor            # float64, one per update
    b: torch.Tensor
    c: torch.Tensor
    sqrt_ab: torch.Tensor      # sqrt(alpha_bar_{tau_i}), so x0_hat = (x - s eps) / sqrt_ab
    s: torch.Tensor            # sqrt(1 - alpha_bar_{tau_i})

    def x0_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, q) of the same update written x_prev = p x0_hat + q x_t + c z (see the module doc)."""
        return -self.b * self.sqrt_ab / self.s, self.a + self.b / self.s


def plan(process: NoiseProcess, steps: int, sampler: str = "ancestral", eta: float = 1.0) -> SamplerPlan:
    """Coefficient tables of ``sampler`` on ``steps`` evenly spaced timesteps of ``process``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: allowed are {', '.join(SAMPLERS)}")
    taus = timestep_sequence(process.n_T, steps)
    current = torch.tensor(taus[::-1])
    previous = torch.tensor(([0] + taus[:-1])[::-1])
    alpha_bar = process.alpha_bar.cpu()
    ab_t = alpha_bar[current]
    ab_prev = alpha_bar[previous]
    if sampler == "ancestral":
        beta = 1.0 - ab_t / ab_prev
        alpha = 1.0 - beta
        a = 1.0 / alpha.sqrt()
        b = -beta / (alpha.sqrt() * (1.0 - ab_t).sqrt())
        c = torch.where(previous > 0, beta.sqrt(), torch.zeros_like(beta))
    else:
        c = eta * ((1.0 - ab_t / ab_prev) * (1.0 - ab_prev) / (1.0 - ab_t)).sqrt()
        c2 = (1.0 - ab_prev - c ** 2).clamp(min=0.0).sqrt()
        a = (ab_prev / ab_t).sqrt()
        b = c2 - (ab_prev * (1.0 - ab_t) / ab_t).sqrt()
    return SamplerPlan(current.tolist(), previous.tolist(), a, b, c, ab_t.sqrt(), (1.0 - ab_t).sqrt())


def predict(net: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
            guidance: float = 0.0, precision: str = "auto") -> torch.Tensor:
    """The network's prediction of its target at (x, t), float32: unconditional when ``labels``
    is None, else for those digits, guided with weight ``guidance`` (``process.guided``)."""
    with autocast(x.device, precision):  # x and the mix stay float32
        if labels is None:
            return net(x, t).float()
        if guidance == 0:
            return net(x, t, labels).float()
        both = net(torch.cat([x, x]), torch.cat([t, t]),
                   torch.cat([labels, torch.full_like(labels, NO_LABEL)])).float()
    conditional, unconditional = both.chunk(2)
    return guided(conditional, unconditional, guidance)


@torch.no_grad()
def sample(net: nn.Module, process: NoiseProcess, n: int, *, steps: int | None = None,
           sampler: str = "ancestral", eta: float = 1.0, device: torch.device | str = "cpu",
           generator: torch.Generator | None = None, batch_size: int | None = None,
           x_T: torch.Tensor | None = None,
           callback: Callable[[int, torch.Tensor], None] | None = None,
           precision: str = "auto", clip_x0: bool = False, data_scale: float = 1.0,
           prior: str = "exact", labels: torch.Tensor | None = None,
           guidance: float = 0.0) -> torch.Tensor:
    """Draw ``n`` images in [-1, 1]-ish float32 (N, 1, 28, 28) from ``net`` under ``process``.

    ``x_T`` fixes the starting noise (else drawn from ``process.prior``); ``callback(t, x)`` sees the
    state after each update (t = the timestep reached), e.g. to record a reverse trajectory.
    ``process`` is moved to ``device`` (``nn.Module.to``) if it is elsewhere.
    ``precision`` is the network's arithmetic (see ``diffusion.network.resolve_precision``);
    ``clip_x0`` clips each step's x0 estimate to the data range [-data_scale, data_scale] (see the
    module doc). ``prior`` is where sampling starts: ``exact``, the forward marginal at T,
    sqrt(1 - alpha_bar_T) eps_T (``NoiseProcess.prior``), or ``unit``, eps_T itself (N(0, I) for
    DDPM, as Ho et al.'s Algorithm 2 starts). ``labels`` (n digits, for a conditional network)
    asks for one digit per image, with classifier-free ``guidance`` w >= 0 (``predict``).
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}: allowed are {', '.join(map(repr, PRIORS))}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels: {len(labels)} given for n = {n} images; give one per image")
    device = torch.device(device)
    process.to(device)
    run = plan(process, steps or process.n_T, sampler, eta)
    p, q = run.x0_form()
    a, b, c, p, q = (coef.to(device=device, dtype=torch.float32)
                     for coef in (run.a, run.b, run.c, p, q))
    batch_size = batch_size or n
    was_training = net.training
    net.eval()
    chunks = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        shape = (size, 1, 28, 28)
        chunk_labels = None if labels is None else labels[start:start + size].to(device)
        if x_T is not None:
            x = x_T[start:start + size].to(device)
        elif prior == "exact":
            x = process.prior(shape, generator=generator)
        else:
            x = process.noise(torch.full((size,), process.n_T, device=device), shape,
                              generator=generator)
        for i, (t, t_prev) in enumerate(zip(run.timesteps, run.previous)):
            t_batch = torch.full((size,), t, device=device, dtype=torch.long)
            prediction = predict(net, x, t_batch.float() / process.n_T, chunk_labels, guidance,
                                 precision)  # x, a, b, c and the noise stay float32
            eps, x0_hat = process.eps_and_x0(x, t_batch, prediction)  # from the net's target
            if clip_x0:
                x = p[i] * x0_hat.clamp(-data_scale, data_scale) + q[i] * x
            else:
                x = a[i] * x + b[i] * eps
            if t_prev > 0 and run.c[i] != 0:
                prev_batch = torch.full((size,), t_prev, device=device, dtype=torch.long)
                x = x + c[i] * process.noise(prev_batch, shape, generator=generator)
            if callback is not None:
                callback(t_prev, x)
        chunks.append(x)
    net.train(was_training)
    return torch.cat(chunks)
