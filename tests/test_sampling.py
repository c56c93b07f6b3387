"""The samplers' updates against hand computations on tiny schedules."""

import math

import pytest
import torch
from torch import nn

from diffusion.process import GammaProcess, GaussianProcess
from diffusion.sampling import plan, sample, timestep_sequence


class ConstantNet(nn.Module):
    """eps_theta(x, t) = 0.3 x + t: simple, and depends on both inputs."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return 0.3 * x + t.view(-1, 1, 1, 1)


class RecordedNoise(GaussianProcess):
    """Gaussian process whose noise draws are recorded with the timestep asked for."""

    def __init__(self, *args):
        super().__init__(*args)
        self.draws = []

    def noise(self, t, shape, *, generator=None):
        z = super().noise(t, shape, generator=generator)
        self.draws.append((t.clone(), z.clone()))
        return z


def test_timestep_sequence():
    assert timestep_sequence(1000, 1000) == list(range(1, 1001))
    seq = timestep_sequence(1000, 10)
    assert len(seq) == 10 and seq[0] == 1 and seq[-1] == 1000
    assert all(b > a for a, b in zip(seq, seq[1:]))
    assert timestep_sequence(7, 1) == [7]
    for steps in (0, 8):
        with pytest.raises(ValueError, match="between 1 and n_T"):
            timestep_sequence(7, steps)


def test_ancestral_update_matches_ho_algorithm_2_by_hand():
    process = RecordedNoise((0.1, 0.3), 3)
    net = ConstantNet()
    x_T = torch.full((1, 1, 28, 28), 0.5)
    out = sample(net, process, 1, x_T=x_T, generator=torch.Generator().manual_seed(0))
    # Ho eq. 11 by hand in float64: x_{t-1} = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t)
    # + sqrt(beta_t) z, with betas 0.1, 0.2, 0.3 and no noise on the last step.
    betas = [None, 0.1, 0.2, 0.3]
    alpha_bar = [1.0, 0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7]
    x = x_T.double()
    noises = iter(process.draws)
    for t in (3, 2, 1):
        eps = 0.3 * x + t / 3
        x = (x - betas[t] / math.sqrt(1 - alpha_bar[t]) * eps) / math.sqrt(1 - betas[t])
        if t > 1:
            t_drawn, z = next(noises)
            assert (t_drawn == t - 1).all()
            x = x + math.sqrt(betas[t]) * z.double()
    assert next(noises, None) is None
    assert torch.allclose(out.double(), x, atol=1e-5)


def test_ddim_eta_zero_is_deterministic_given_start():
    process = GammaProcess((1e-4, 0.02), 50, 0.001)
    x_T = process.prior((4, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    runs = [sample(ConstantNet(), process, 4, steps=10, sampler="ddim", eta=0.0, x_T=x_T,
                   generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    assert torch.equal(runs[0], runs[1])


def test_ddim_eta_one_full_steps_has_ancestral_mean_and_posterior_variance():
    process = GaussianProcess((1e-4, 0.02), 20)
    ancestral = plan(process, 20, "ancestral")
    ddim = plan(process, 20, "ddim", eta=1.0)
    assert torch.allclose(ddim.a, ancestral.a, rtol=1e-12)
    assert torch.allclose(ddim.b, ancestral.b, rtol=1e-10)
    t = torch.tensor(ddim.timesteps)
    ab, ab_prev, beta = process.alpha_bar[t], process.alpha_bar[t - 1], process.beta[t]
    beta_tilde = (1 - ab_prev) / (1 - ab) * beta  # Ho et al. eq. 7
    assert torch.allclose(ddim.c ** 2, beta_tilde, rtol=1e-10)
    assert ddim.c[-1] == 0 and ancestral.c[-1] == 0


def test_respaced_ancestral_uses_respaced_betas():
    process = GaussianProcess((1e-4, 0.02), 100)
    run = plan(process, 5, "ancestral")
    for i, (t, t_prev) in enumerate(zip(run.timesteps, run.previous)):
        beta = 1 - process.alpha_bar[t] / process.alpha_bar[t_prev]
        assert run.a[i] == pytest.approx(1 / math.sqrt(1 - beta.item()), rel=1e-12)


def test_gamma_reverse_noise_has_the_index_of_the_step_target():
    process = GammaProcess((1e-4, 0.02), 10, 0.001)
    asked = []
    original = process.noise

    def spy(t, shape, **kwargs):
        asked.append(int(t[0]))
        return original(t, shape, **kwargs)

    process.noise = spy
    sample(ConstantNet(), process, 2, steps=4, generator=torch.Generator().manual_seed(0))
    taus = timestep_sequence(10, 4)
    # First the prior at n_T, then the noise of each step's target timestep (none for t = 0).
    assert asked == [10] + taus[:-1][::-1][:len(taus) - 1]


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="allowed are ancestral, ddim"):
        plan(GaussianProcess((1e-4, 0.02), 10), 10, "euler")


class OracleNet(nn.Module):
    """The exact predictor for data that is one image x*: its noise is
    eps(x_t, t) = (x_t - sqrt(alpha_bar_t) x*) / sqrt(1 - alpha_bar_t) (Ho et al. eq. 4 solved
    for eps), and it returns the process's target: eps, x*, or v = a eps - s x*. Every correct
    sampler must then end at x*, whatever the noise law, schedule, target or step count."""

    def __init__(self, process, target):
        super().__init__()
        self.process, self.target = process, target
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        index = torch.round(t * self.process.n_T).long()
        alpha_bar = self.process.alpha_bar[index].view(-1, 1, 1, 1)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        eps = (x.double() - a * self.target) / s
        if self.process.target == "x0":
            return self.target.expand_as(eps)
        return a * eps - s * self.target if self.process.target == "v" else eps


EVERY_PROCESS = [kind((1e-4, 0.02), 1000, *extra, schedule=schedule, target=target)
                 for kind, extra in ((GaussianProcess, ()), (GammaProcess, (0.001,)))
                 for schedule in ("linear", "cosine") for target in ("eps", "x0", "v")]


# Every process at 10 and 100 steps; the seed's (linear, eps) also at all 1000.
CASES = [(p, steps) for p in EVERY_PROCESS
         for steps in ((10, 1000) if (p.schedule, p.target) == ("linear", "eps") else (10, 100))]


@pytest.mark.parametrize("process, steps", CASES,
                         ids=[f"{p.name}-{p.schedule}-{p.target}-{n}" for p, n in CASES])
@pytest.mark.parametrize("sampler, eta", [("ancestral", 1.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_every_sampler_lands_on_the_data_point_with_the_exact_noise_predictor(process, sampler, eta,
                                                                              steps):
    target = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(1)).double() * 2 - 1
    images = sample(OracleNet(process, target), process, 3, steps=steps, sampler=sampler, eta=eta,
                    generator=torch.Generator().manual_seed(2))
    assert torch.allclose(images.double(), target.expand(3, -1, -1, -1), atol=1e-4), \
        (images.double() - target).abs().max()


@pytest.mark.parametrize("sampler, eta", [("ancestral", 1.0), ("ddim", 0.0)])
def test_clipping_x0_changes_nothing_while_the_estimate_is_inside_the_data_range(sampler, eta):
    # 0.3 x + t as eps keeps x0_hat far outside [-1, 1] at large t, so compare on the exact
    # predictor: its x0 estimate is the data point itself, inside [-1, 1] at every step.
    process = GammaProcess((1e-4, 0.02), 100, theta_0=0.001)
    target = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(1)).double() * 2 - 1
    runs = [sample(OracleNet(process, target), process, 2, steps=20, sampler=sampler, eta=eta,
                   generator=torch.Generator().manual_seed(2), clip_x0=clip)
            for clip in (False, True)]
    assert torch.allclose(runs[0], runs[1], atol=1e-5)


def test_clipping_x0_is_the_posterior_mean_at_the_clipped_estimate():
    # One ancestral step from t = 2 to 1 (no respacing): Ho et al. eq. 7 with x0 clipped.
    process = GaussianProcess((1e-4, 0.02), 2)
    x_T = torch.full((1, 1, 28, 28), 3.0)
    seen = []
    sample(ConstantNet(), process, 1, steps=2, x_T=x_T, clip_x0=True,
           generator=torch.Generator().manual_seed(0),
           callback=lambda t, x: seen.append((t, x.clone())))
    ab, beta = process.alpha_bar.double(), process.beta.double()
    eps = 0.3 * 3.0 + 1.0
    x0_hat = max(-1.0, min(1.0, (3.0 - math.sqrt(1 - ab[2]) * eps) / math.sqrt(ab[2])))
    mean = (math.sqrt(ab[1]) * beta[2] / (1 - ab[2]) * x0_hat
            + math.sqrt(1 - beta[2]) * (1 - ab[1]) / (1 - ab[2]) * 3.0)
    noise = seen[0][1] - mean  # the step's noise is sqrt(beta_2) z, z standard normal
    assert seen[0][0] == 1 and abs(float(noise.mean())) < 0.02
    assert float(noise.std()) == pytest.approx(math.sqrt(beta[2]), rel=0.1)


def test_prior_unit_starts_from_eps_T_and_exact_from_the_forward_marginal():
    process = GaussianProcess((1e-4, 0.02), 10)
    # One step from x_T to 0 with eps_hat = 0.3 x_T + 1: x_0 = a x_T + b eps_hat, linear in x_T,
    # so the two starts' outcomes differ exactly by the factor sqrt(1 - alpha_bar_T) on x_T.
    run = plan(process, 1)
    a, b = run.a[0].item(), run.b[0].item()
    out = {prior: sample(ConstantNet(), process, 2, steps=1, prior=prior,
                         generator=torch.Generator().manual_seed(0)) for prior in ("exact", "unit")}
    x_T = {prior: (out[prior] - b) / (a + 0.3 * b) for prior in out}
    scale = (1 - process.alpha_bar[10]).sqrt().item()
    assert torch.allclose(x_T["exact"], scale * x_T["unit"], atol=1e-5)
    assert x_T["unit"].std().item() == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError, match="unknown prior 'zero'"):
        sample(ConstantNet(), process, 1, prior="zero")


def test_clipping_uses_the_data_scale():
    process = GaussianProcess((1e-4, 0.02), 5, target="x0")
    net = ConstantNet()  # predicts x0 = 0.3 x + t: far outside [-0.5, 0.5] for x_T ~ N(0, 1)
    seen = []
    sample(net, process, 2, steps=5, clip_x0=True, data_scale=0.5,
           generator=torch.Generator().manual_seed(0), callback=lambda t, x: seen.append(x))
    assert seen[-1].abs().max() <= 0.5 + 1e-6  # the last step is the clipped x0 estimate
