"""Training loop: determinism, exact resume, EMA warm-up and the non-finite loss guard."""

import copy
import math

import pytest
import torch

from diffusion.network import DenoiserCNN, resolve_precision
from diffusion.process import GammaProcess, GaussianProcess
from diffusion.training import (NonFiniteLossError, autocast, denoising_loss, ema_decay_at,
                                ema_update, learning_rate, make_state, train)
from tests.helpers import train_config

CONFIG = train_config(epochs=2, batch_size=32, lr=1e-3, ema_decay=0.99, holdout_subset=16, seed=5)


def images(n=80, seed=0):
    return (torch.rand(n, 28, 28, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def fresh_state(config=CONFIG):
    torch.manual_seed(config.seed)
    return make_state(DenoiserCNN((4, 4)), config, torch.device("cpu"))


def assert_same_state(a, b):
    for key in ("net", "ema"):
        sa, sb = getattr(a, key).state_dict(), getattr(b, key).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("process", [GaussianProcess((1e-4, 0.02), 20),
                                     GammaProcess((1e-4, 0.02), 20, 0.001)])
def test_same_seed_gives_bit_identical_weights(process):
    a = train(fresh_state(), process, images(), images(seed=1), CONFIG)
    b = train(fresh_state(), process, images(), images(seed=1), CONFIG)
    assert_same_state(a, b)
    assert [r.train_loss for r in a.log] == [r.train_loss for r in b.log]


def test_resume_from_saved_state_matches_uninterrupted_run():
    process = GammaProcess((1e-4, 0.02), 20, 0.001)
    straight = train(fresh_state(), process, images(), images(seed=1), CONFIG)

    saved = {}
    one_epoch = train_config(**{**CONFIG.__dict__, "epochs": 1})
    train(fresh_state(), process, images(), images(seed=1), one_epoch,
          on_checkpoint=lambda s: saved.update(copy.deepcopy(s.state_dict())))
    resumed = fresh_state()
    resumed.load_state_dict(saved)
    assert resumed.epoch == 1
    train(resumed, process, images(), images(seed=1), CONFIG)
    assert_same_state(straight, resumed)
    assert straight.optimizer.state_dict()["state"][0]["exp_avg"].equal(
        resumed.optimizer.state_dict()["state"][0]["exp_avg"])
    assert [r.heldout_loss for r in straight.log] == [r.heldout_loss for r in resumed.log]


def test_loss_goes_down_on_a_small_set():
    process = GaussianProcess((1e-4, 0.02), 20)
    config = train_config(epochs=8, batch_size=8, lr=5e-3, ema_decay=0.9, holdout_subset=16, seed=0)
    squares = torch.zeros(64, 28, 28, dtype=torch.uint8)
    squares[:, 8:20, 8:20] = 255  # one learnable image: the network can tell it from noise
    state = train(fresh_state(config), process, squares, squares[:16], config)
    assert state.log[-1].train_loss < 0.6 * state.log[0].train_loss
    assert state.log[-1].heldout_loss < 0.6 * state.log[0].heldout_loss


def test_ema_update_warms_up_then_follows_decay():
    net, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(1.0)
    ema.weight.data.fill_(0.0)
    ema_update(ema, net, decay=0.999, step=0)  # warm-up decay 1/10
    assert ema.weight.item() == pytest.approx(0.9)
    ema.weight.data.fill_(0.0)
    ema_update(ema, net, decay=0.5, step=10_000)
    assert ema.weight.item() == pytest.approx(0.5)


def test_non_finite_loss_stops_training_naming_epoch_and_step():
    class Exploding(DenoiserCNN):
        calls = 0

        def forward(self, x, t):
            Exploding.calls += 1
            out = super().forward(x, t)
            return out * float("nan") if Exploding.calls == 2 else out

    torch.manual_seed(0)
    state = make_state(Exploding((4,)), CONFIG, torch.device("cpu"))
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 2 of 3"):
        train(state, GaussianProcess((1e-4, 0.02), 20), images(), images(seed=1), CONFIG)
    assert state.epoch == 0


def test_bf16_autocast_losses_agree_with_fp32_within_2_percent():
    process = GammaProcess((1e-4, 0.02), 20, 0.001)
    runs = {}
    for precision in ("fp32", "bf16"):
        config = train_config(**{**CONFIG.__dict__, "precision": precision})
        runs[precision] = train(fresh_state(config), process, images(), images(seed=1), config)
    fp32, bf16 = runs["fp32"].log, runs["bf16"].log
    assert [r.train_loss for r in fp32] != [r.train_loss for r in bf16]  # bf16 really ran
    for a, b in zip(fp32, bf16):
        assert b.train_loss == pytest.approx(a.train_loss, rel=0.02)
        assert b.heldout_loss == pytest.approx(a.heldout_loss, rel=0.02)


def test_bf16_autocast_touches_the_network_only_and_gamma_noise_stays_exact():
    cpu = torch.device("cpu")
    process = GammaProcess((1e-4, 0.02), 1000, 0.001)
    t = torch.tensor([1, 500, 1000])
    shape = (3, 1, 28, 28)
    with autocast(cpu, "bf16"):
        eps = process.noise(t, shape, generator=torch.Generator().manual_seed(0))
        assert DenoiserCNN((4,))(eps, t / 1000).dtype == torch.bfloat16
        x0 = torch.zeros(shape)
        assert denoising_loss(DenoiserCNN((4,)), process, x0, t, eps, "bf16").dtype == torch.float32
    # The same draw in float64 by hand: Gamma(k_bar_t, 1), centred and scaled, then float32.
    k_bar = process.k_bar[t].view(-1, 1, 1, 1).expand(shape).contiguous()
    gamma = torch._standard_gamma(k_bar, generator=torch.Generator().manual_seed(0))
    assert eps.dtype == torch.float32
    assert torch.equal(eps, ((gamma - k_bar) / k_bar.sqrt()).float())
    # k_bar_T ~ 2.5e10: a draw in bf16 (or float32) would collapse eps to a few values.
    assert eps[2].unique().numel() > 700
    with pytest.raises(ValueError, match="precision = 'fp16' is not allowed"):
        autocast(cpu, "fp16")


def test_bf16_training_is_bit_identical_from_the_same_seed():
    config = train_config(**{**CONFIG.__dict__, "precision": "bf16"})
    process = GaussianProcess((1e-4, 0.02), 20)
    a = train(fresh_state(config), process, images(), images(seed=1), config)
    b = train(fresh_state(config), process, images(), images(seed=1), config)
    assert_same_state(a, b)


@pytest.mark.parametrize("capabilities, expected", [
    ({"amx_bf16": True, "avx512_bf16": True}, "bf16"),   # Sapphire Rapids and later
    ({"avx512_bf16": True}, "bf16"),                     # Cooper Lake, Zen 4
    ({"bf16": True}, "bf16"),                            # ARM64 with BFDOT/BFMMLA
    ({"avx512_f": True, "avx2": True, "avx512_bf16": False}, "fp32"),  # bf16 only emulated
    ({}, "fp32"),
])
def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with autocast(torch.device("cpu"), "auto"):
        assert torch.is_autocast_enabled("cpu") == (expected == "bf16")


def test_model_runs_the_network_in_its_precision():
    from diffusion.model import DiffusionModel

    torch.manual_seed(0)
    net = DenoiserCNN((4,))
    x, process = torch.randn(2, 1, 28, 28), GaussianProcess((1e-4, 0.02), 10)
    fp32, bf16 = (DiffusionModel(net, process, precision=p)(x, 5) for p in ("fp32", "bf16"))
    assert fp32.dtype == bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
    assert torch.allclose(fp32, bf16, atol=0.05)
    assert torch.equal(fp32, net(x, torch.full((2,), 0.5)))
    with pytest.raises(ValueError, match="precision = 'half' is not allowed"):
        DiffusionModel(net, process, precision="half")


# ---------------------------------------------------------------- the choices the seed leaves open
def learning_rates_of_each_step(config) -> list[float]:
    """Train with ``config`` and return the learning rate each optimiser step used."""
    state = fresh_state(config)
    seen = []
    step = state.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(state.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    state.optimizer.step = recording_step
    train(state, GaussianProcess((1e-4, 0.02), 20), images(), images(seed=1), config)
    return seen


def test_warmup_ramps_the_learning_rate_linearly_from_the_step_count():
    config = train_config(**{**CONFIG.__dict__, "warmup": 4, "epochs": 1})
    seen = learning_rates_of_each_step(config)
    assert seen == pytest.approx([config.lr * k / 4 for k in (1, 2, 3)])  # 80 images / 32: 3 steps


def test_gradient_clipping_bounds_the_global_norm_each_step():
    config = train_config(**{**CONFIG.__dict__, "grad_clip": 1e-3, "epochs": 1})
    state = fresh_state(config)
    norms = []
    step = state.optimizer.step

    def recording_step(*args, **kwargs):
        norms.append(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in state.net.parameters()])).item())
        return step(*args, **kwargs)

    state.optimizer.step = recording_step
    train(state, GaussianProcess((1e-4, 0.02), 20), images(), images(seed=1), config)
    assert norms and max(norms) <= 1e-3 * (1 + 1e-5)
    unclipped = fresh_state(CONFIG)
    loss = denoising_loss(unclipped.net, GaussianProcess((1e-4, 0.02), 20),
                          torch.rand(32, 1, 28, 28) * 2 - 1, torch.randint(1, 21, (32,)),
                          torch.randn(32, 1, 28, 28))
    loss.backward()
    assert sum(p.grad.norm() ** 2 for p in unclipped.net.parameters()) ** 0.5 > 1e-2  # it did clip


def test_ema_decay_zero_keeps_the_raw_weights():
    config = train_config(**{**CONFIG.__dict__, "ema_decay": 0.0})
    state = train(fresh_state(config), GaussianProcess((1e-4, 0.02), 20), images(), images(seed=1),
                  config)
    assert all(torch.equal(a, b) for a, b in zip(state.net.parameters(), state.ema.parameters()))


def test_data_scale_sets_the_range_the_network_is_trained_on(monkeypatch):
    import diffusion.training as training

    seen = []
    real = training.denoising_loss
    monkeypatch.setattr(training, "denoising_loss",
                        lambda net, process, x0, *a, **k: seen.append(x0.abs().max()) or real(net, process, x0, *a, **k))
    config = train_config(**{**CONFIG.__dict__, "data_scale": 0.5, "epochs": 1})
    bright = torch.full((80, 28, 28), 255, dtype=torch.uint8)
    train(fresh_state(config), GaussianProcess((1e-4, 0.02), 20), bright, bright[:16], config)
    assert seen and all(value == 0.5 for value in seen)


# ---------------------------------------------------------------- the recipe for short runs
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decaying_lr_starts_at_lr_after_the_warm_up_and_ends_at_the_floor(schedule):
    config = train_config(lr=2e-3, warmup=10, lr_schedule=schedule, lr_floor=0.1)
    total = 111  # the decay runs over steps 10..110: 100 steps
    assert learning_rate(0, total, config) == pytest.approx(2e-3 / 10)
    assert learning_rate(9, total, config) == pytest.approx(2e-3)      # the warm-up's last step
    assert learning_rate(10, total, config) == pytest.approx(2e-3)     # the decay's first
    assert learning_rate(total - 1, total, config) == pytest.approx(2e-4)  # floor * lr, at the end
    assert learning_rate(10 * total, total, config) == pytest.approx(2e-4)  # and beyond it
    middle = learning_rate(10 + 50, total, config)  # half-way through the decay: both give the mean
    assert middle == pytest.approx(1.1e-3)
    quarter = learning_rate(10 + 25, total, config)
    expected = (0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2 if schedule == "cosine" else 0.1 + 0.9 * 0.75)
    assert quarter == pytest.approx(2e-3 * expected)
    lrs = [learning_rate(step, total, config) for step in range(10, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_constant_lr_is_the_lr_after_the_warm_up():
    config = train_config(lr=1e-3, warmup=0, lr_schedule="constant", lr_floor=0.5)
    assert {learning_rate(step, 100, config) for step in (0, 50, 99, 1000)} == {1e-3}
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
        learning_rate(20, 100, train_config(lr_schedule="step"))


def test_training_steps_follow_the_schedule_fitted_to_the_run():
    config = train_config(**{**CONFIG.__dict__, "epochs": 2, "warmup": 2, "lr_schedule": "cosine",
                            "lr_floor": 0.0})
    seen = learning_rates_of_each_step(config)
    # 80 images / 32 = 3 steps per epoch, 6 in all: the warm-up, then cosine down to 0
    assert seen == pytest.approx([learning_rate(s, 6, config) for s in range(6)])
    assert seen[1] == pytest.approx(config.lr) and seen[-1] == pytest.approx(0.0, abs=1e-12)


def test_ema_warm_up_constant_sets_how_fast_the_decay_rises():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)            # K = 10: 1/10 at the first step
    assert ema_decay_at(0, 0.999, warmup=4) == pytest.approx(0.25)
    assert ema_decay_at(90, 0.999, warmup=10) == pytest.approx(0.91)
    assert ema_decay_at(90, 0.999, warmup=4) == pytest.approx(91 / 94)
    assert ema_decay_at(8991, 0.999) == pytest.approx(0.999)       # the cap, 19 epochs of 469 steps
    assert ema_decay_at(8980, 0.999) < 0.999
    assert ema_decay_at(10**6, 0.999, warmup=4) == 0.999
    net, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(1.0)
    ema.weight.data.fill_(0.0)
    ema_update(ema, net, decay=0.999, step=0, warmup=4)
    assert ema.weight.item() == pytest.approx(0.75)


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
@pytest.mark.parametrize("process_class", [GaussianProcess, GammaProcess])
def test_min_snr_loss_is_the_clipped_snr_times_the_x0_error_for_every_target(target, process_class):
    """Whatever the target, the weighted loss of a prediction equals
    min(SNR, gamma) ||x0_hat - x0||^2, with x0_hat what the prediction implies."""
    extra = (0.001,) if process_class is GammaProcess else ()
    process = process_class((1e-4, 0.02), 1000, *extra, target=target)
    gamma = 5.0
    x0 = torch.rand(6, 1, 28, 28, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 10, 100, 300, 600, 1000])
    eps = process.noise(t, x0.shape, generator=torch.Generator().manual_seed(0)).double()
    x_t = process.q_sample(x0, t, eps)
    prediction = process.training_target(x0, eps, t) + 0.1 * torch.randn(x0.shape, dtype=torch.float64)
    target_error = ((prediction - process.training_target(x0, eps, t)) ** 2).flatten(1).mean(1)
    x0_error = ((process.eps_and_x0(x_t, t, prediction)[1] - x0) ** 2).flatten(1).mean(1)
    snr = process.snr(t)
    weight = process.min_snr_weight(t, gamma).double()
    assert torch.allclose(weight * target_error, snr.clamp(max=gamma) * x0_error, rtol=1e-4)
    closed_form = {"eps": (gamma / snr).clamp(max=1), "x0": snr.clamp(max=gamma),
                   "v": snr.clamp(max=gamma) / (snr + 1)}[target]
    assert torch.allclose(weight, closed_form)
    assert snr[0] > gamma > snr[-1]  # both sides of the clip are tested


def test_min_snr_gamma_weights_each_images_error_in_the_loss():
    process = GaussianProcess((1e-4, 0.02), 1000)
    net = DenoiserCNN((4, 4))
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    t = torch.tensor([1, 5, 500, 1000])
    eps = torch.randn(4, 1, 28, 28)
    per_image = torch.stack([denoising_loss(net, process, x0[i:i + 1], t[i:i + 1], eps[i:i + 1],
                                            "fp32") for i in range(4)])
    weighted = denoising_loss(net, process, x0, t, eps, "fp32", min_snr_gamma=5.0)
    assert weighted.item() == pytest.approx((per_image * process.min_snr_weight(t, 5.0)).mean().item(), rel=1e-5)
    assert denoising_loss(net, process, x0, t, eps, "fp32").item() == pytest.approx(per_image.mean().item(), rel=1e-5)
