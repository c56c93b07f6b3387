"""The noise processes against their closed forms (Ho et al. 2020; DDGM, Nachmani et al. 2021)."""

import math

import pytest
import torch
from scipy import stats

from diffusion.process import (MAX_GAMMA_SHAPE, MIN_GAMMA_SHAPE, GammaProcess, GaussianProcess,
                               ScheduleError, make_process)

N_DRAWS = 100_000


def moments(x: torch.Tensor) -> tuple[float, float, float]:
    x = x.double().flatten()
    mean, var = x.mean().item(), x.var().item()
    skew = (((x - x.mean()) ** 3).mean() / x.var(unbiased=False) ** 1.5).item()
    return mean, var, skew


def test_linear_schedule_and_alpha_bar():
    process = GaussianProcess((1e-4, 0.02), 1000)
    assert process.beta[0] == 0 and process.alpha_bar[0] == 1
    assert process.beta[1].item() == pytest.approx(1e-4)
    assert process.beta[1000].item() == pytest.approx(0.02)
    assert torch.allclose(process.beta[2:] - process.beta[1:-1],
                          torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    expected = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert process.alpha_bar[1000].item() == pytest.approx(expected, rel=1e-10)


def test_gamma_parameters_satisfy_k_bar_theta_squared_identity():
    # DDGM: k_bar_t theta_t^2 = 1 - alpha_bar_t, so eps has unit variance at every t.
    process = GammaProcess((1e-4, 0.02), 1000, 0.001)
    lhs = process.k_bar[1:] * process.theta[1:] ** 2
    assert torch.allclose(lhs, 1 - process.alpha_bar[1:], rtol=1e-9, atol=0)
    assert process.k_bar[1000].item() == pytest.approx(2.5e10, rel=0.1)


@pytest.mark.parametrize("process", [GaussianProcess((1e-4, 0.02), 100),
                                     GammaProcess((1e-4, 0.02), 100, 0.003)])
@pytest.mark.parametrize("t_value", [1, 30, 100])
def test_forward_process_matches_closed_form_moments(process, t_value):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((N_DRAWS, 1, 1, 1), 0.7)
    t = torch.full((N_DRAWS,), t_value)
    eps = process.noise(t, x0.shape, generator=generator)
    mean, var, skew = moments(process.q_sample(x0, t, eps))
    alpha_bar = process.alpha_bar[t_value].item()
    assert mean == pytest.approx(math.sqrt(alpha_bar) * 0.7, abs=4 * math.sqrt((1 - alpha_bar) / N_DRAWS))
    assert var == pytest.approx(1 - alpha_bar, rel=0.02)
    expected_skew = 0.0 if isinstance(process, GaussianProcess) else 2 / process.k_bar[t_value].sqrt().item()
    # k_bar_1 ~ 11 here: skewness ~0.6, whose sampling error exceeds the normal-case sqrt(6/n).
    assert skew == pytest.approx(expected_skew, abs=0.05)


def test_gamma_noise_at_t_max_is_not_quantised_and_is_standard_normal():
    process = GammaProcess((1e-4, 0.02), 1000, 0.001)
    t = torch.full((N_DRAWS,), 1000)
    eps = process.noise(t, (N_DRAWS,), generator=torch.Generator().manual_seed(1))
    assert eps.dtype == torch.float32
    # A float32 draw of G ~ Gamma(2.5e10) minus its mean moves in steps of ~0.015 std: a few
    # hundred distinct values. Exact draws are (nearly) all distinct.
    assert eps.unique().numel() > 0.999 * N_DRAWS
    mean, var, _ = moments(eps)
    assert abs(mean) < 4 / math.sqrt(N_DRAWS)
    assert var == pytest.approx(1.0, abs=4 * math.sqrt(2 / N_DRAWS))
    assert stats.kstest(eps.double().numpy(), "norm").statistic < 1.95 / math.sqrt(N_DRAWS)


def test_gamma_noise_at_t_one_has_gamma_skewness():
    process = GammaProcess((1e-4, 0.02), 1000, 0.001)
    t = torch.ones(N_DRAWS, dtype=torch.long)
    eps = process.noise(t, (N_DRAWS,), generator=torch.Generator().manual_seed(2))
    k_bar_1 = process.k_bar[1].item()
    mean, var, skew = moments(eps)
    assert abs(mean) < 4 / math.sqrt(N_DRAWS) and var == pytest.approx(1.0, rel=0.02)
    assert skew == pytest.approx(2 / math.sqrt(k_bar_1), abs=4 * math.sqrt(6 / N_DRAWS))


def test_noise_is_reproducible_from_the_generator():
    process = GammaProcess((1e-4, 0.02), 50, 0.001)
    t = torch.arange(1, 51)
    draw = lambda: process.noise(t, (50, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(draw(), draw())


def test_the_x0_estimate_from_the_true_noise_inverts_q_sample():
    process = GammaProcess((1e-4, 0.02), 100, 0.001)
    x0 = torch.rand(8, 1, 28, 28) * 2 - 1
    t = torch.arange(1, 9) * 12
    eps = process.noise(t, x0.shape, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(process.eps_and_x0(process.q_sample(x0, t, eps), t, eps)[1], x0, atol=1e-4)


def test_config_round_trip_and_noise_names():
    sections = [  # params.yaml sections
        {"noise": "gaussian", "schedule": "linear", "target": "eps", "betas": [1e-4, 0.02], "n_T": 10},
        {"noise": "gamma", "schedule": "cosine", "target": "v", "betas": [1e-4, 0.02], "n_T": 10,
         "theta_0": 0.01}]
    for section, kind in zip(sections, (GaussianProcess, GammaProcess)):
        process = make_process(section)
        assert type(process) is kind and process.config() == section
        rebuilt = make_process(process.config())
        assert type(rebuilt) is type(process) and rebuilt.config() == process.config()
    with pytest.raises(ValueError, match="allowed are 'gaussian', 'gamma'"):
        make_process({"noise": "vae"})


@pytest.mark.parametrize("process", [GaussianProcess((1e-4, 0.02), 10),
                                     GammaProcess((1e-4, 0.02), 10, 0.01)])
def test_schedules_are_float64_buffers_that_follow_the_module(process, tmp_path):
    """A process is an nn.Module: its schedules move with .to() and survive pickling, with no
    cache of device copies beside them."""
    names = {name for name, _ in process.named_buffers()}
    assert {"beta", "alpha", "alpha_bar"} <= names
    assert all(buffer.dtype == torch.float64 for buffer in process.buffers())
    assert not process.state_dict()  # derived from the config, so not saved with the weights
    torch.save(process, tmp_path / "process.pt")
    copy = torch.load(tmp_path / "process.pt", weights_only=False)
    assert copy.config() == process.config() and torch.equal(copy.alpha_bar, process.alpha_bar)
    t = torch.tensor([1, 5, 10])
    draw = lambda p: p.noise(t, (3, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw(copy), draw(process))


@pytest.mark.parametrize("end", ["smallest", "largest"])
def test_gamma_noise_is_exact_at_both_ends_of_the_allowed_theta_0(end):
    """At the ends of ``theta_0_range`` the Gamma shapes reach MIN_GAMMA_SHAPE (t = 1) and
    MAX_GAMMA_SHAPE (t = T): the draws there still have mean 0, variance 1 and the skewness
    2 / sqrt(k_bar), and are not quantised."""
    low, high = GammaProcess((1e-4, 0.02), 1000, 0.001).theta_0_range()
    process = GammaProcess((1e-4, 0.02), 1000, low if end == "smallest" else high)
    t_value = 1000 if end == "smallest" else 1
    eps = process.noise(torch.full((N_DRAWS,), t_value), (N_DRAWS,),
                        generator=torch.Generator().manual_seed(5))
    k_bar = process.k_bar[t_value].item()
    assert k_bar == pytest.approx(MAX_GAMMA_SHAPE if end == "smallest" else MIN_GAMMA_SHAPE)
    mean, var, skew = moments(eps)
    assert abs(mean) < 4 / math.sqrt(N_DRAWS)
    if end == "smallest":  # nearly Gaussian: tight moments, draws as distinct as float32 randn's
        assert var == pytest.approx(1.0, abs=4 * math.sqrt(2 / N_DRAWS))  # (99.93 %; 99.76 % at
        assert eps.unique().numel() > 0.998 * N_DRAWS                     # k_bar 1e17: too coarse)
    else:  # Gamma(1e-3): skewness 63, so the sample variance scatters widely; check its order
        assert 0.5 < var < 2.0 and skew > 20


@pytest.mark.parametrize("make, why", [
    (lambda: GaussianProcess((1e-8, 2e-8), 1000), "1 - alpha_bar_T = 1.5e-05 is below 0.001"),
    (lambda: GaussianProcess((0.5, 0.9), 1000), "alpha_bar_T = 0 is below 1e-30"),
    (lambda: GammaProcess((1e-4, 0.02), 1000, 1e155), "theta_0 = 1e+155 is outside"),
    (lambda: GammaProcess((1e-4, 0.02), 1000, 1e-200), "theta_0 = 1e-200 is outside"),
    (lambda: GammaProcess((1e-4, 0.02), 1000, 1e-15), "theta_0 = 1e-15 is outside"),
])
def test_schedules_that_cannot_be_computed_exactly_are_refused(make, why):
    with pytest.raises(ScheduleError, match=why.replace("+", r"\+").replace(".", r"\.")):
        make()


# ---------------------------------------------------------------- schedules and targets
def test_cosine_schedule_matches_its_closed_form_and_clips_beta():
    """Nichol and Dhariwal (2021), eq. 17: alpha_bar_t = f(t) / f(0),
    f(t) = cos((t / T + s) / (1 + s) * pi / 2)^2, beta_t clipped at 0.999."""
    n_T, s = 1000, 0.008
    process = GaussianProcess((1e-4, 0.02), n_T, schedule="cosine")
    f = lambda t: math.cos((t / n_T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (1, 10, 250, 500, 900):
        assert process.alpha_bar[t].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert process.beta[1:].max().item() == pytest.approx(0.999) and process.beta[n_T] == 0.999
    assert torch.all(process.beta[1:] > 0) and torch.all(process.alpha_bar[1:] < process.alpha_bar[:-1])
    assert process.beta[1].item() == pytest.approx(1 - f(1) / f(0), rel=1e-9)


def test_gamma_noise_on_the_cosine_schedule_is_exact_and_finite():
    """On the cosine schedule alpha_bar_T is ~2e-9, so k_bar_T = (1 / alpha_bar_T - 1) / theta_0^2
    grows to ~4e14 for theta_0 = 1e-3: still within the exact float64 range, and the theta_0
    range the check allows is narrower than on the linear schedule."""
    process = GammaProcess((1e-4, 0.02), 1000, 0.001, schedule="cosine")
    assert torch.allclose(process.k_bar[1:] * process.theta[1:] ** 2, 1 - process.alpha_bar[1:],
                          rtol=1e-9, atol=0)
    assert 1e14 < process.k_bar[1000].item() < MAX_GAMMA_SHAPE
    for t_value in (1, 1000):
        eps = process.noise(torch.full((N_DRAWS,), t_value), (N_DRAWS,),
                            generator=torch.Generator().manual_seed(6))
        assert torch.isfinite(eps).all() and eps.unique().numel() > 0.99 * N_DRAWS
        mean, var, skew = moments(eps)
        assert abs(mean) < 4 / math.sqrt(N_DRAWS) and var == pytest.approx(1, rel=0.03)
        assert skew == pytest.approx(2 / process.k_bar[t_value].sqrt().item(), abs=0.05)
    low, high = process.theta_0_range()
    linear = GammaProcess((1e-4, 0.02), 1000, 0.001).theta_0_range()
    assert linear[0] < low < 0.001 < high
    with pytest.raises(ScheduleError, match="theta_0 = 1e-05 is outside"):
        GammaProcess((1e-4, 0.02), 1000, 1e-5, schedule="cosine")


@pytest.mark.parametrize("kind", ["gaussian", "gamma"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_every_target_converts_back_to_eps_and_x0(kind, schedule, target):
    """eps -> the target -> (eps, x0) round-trips to rounding, for both noise laws."""
    extra = {"theta_0": 0.001} if kind == "gamma" else {}
    process = make_process({"noise": kind, "schedule": schedule, "target": target,
                            "betas": [1e-4, 0.02], "n_T": 1000, **extra})
    generator = torch.Generator().manual_seed(7)
    x0 = (torch.rand(64, 1, 28, 28, generator=generator) * 2 - 1).double()
    t = torch.randint(1, 990, (64,), generator=generator)  # away from alpha_bar ~ 0 at T
    eps = process.noise(t, x0.shape, generator=generator).double()
    x_t = process.q_sample(x0, t, eps)
    eps_hat, x0_hat = process.eps_and_x0(x_t, t, process.training_target(x0, eps, t))
    assert torch.allclose(eps_hat, eps, atol=1e-9) and torch.allclose(x0_hat, x0, atol=1e-9)
    if target == "v":  # v = a eps - s x0 has unit variance when eps and x0 do
        a, s = process.alpha_bar[t].sqrt().view(-1, 1, 1, 1), (1 - process.alpha_bar[t]).sqrt().view(-1, 1, 1, 1)
        assert torch.allclose(process.training_target(x0, eps, t), a * eps - s * x0)


def test_unknown_schedule_or_target_is_refused():
    with pytest.raises(ValueError, match="unknown schedule 'sigmoid'"):
        GaussianProcess((1e-4, 0.02), 10, schedule="sigmoid")
    with pytest.raises(ValueError, match="unknown target 'score'"):
        GaussianProcess((1e-4, 0.02), 10, target="score")
