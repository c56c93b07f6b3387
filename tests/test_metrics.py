"""Tests of diffusion.metrics on hand cases and synthetic Gaussians (on real MNIST features:
test_classifier.py)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusion import metrics
from diffusion.metrics import (
    class_balance,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    nearest_neighbours,
    precision_recall,
    psnr,
    quality_metrics,
    total_variation,
)



def gaussian(n: int, dim: int, seed: int, mean: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, scale, size=(n, dim))


def with_exact_moments(n: int, mean: np.ndarray, cov_sqrt: np.ndarray, seed: int) -> np.ndarray:
    """Samples whose sample mean is `mean` and sample (n-1) covariance is cov_sqrt cov_sqrt^T."""
    samples = gaussian(n, mean.size, seed)
    samples -= samples.mean(axis=0)
    whitening = np.linalg.inv(np.linalg.cholesky(np.cov(samples, rowvar=False)))
    return samples @ whitening.T @ cov_sqrt.T + mean


# ------------------------------------- PSNR ---------------------------------------------


def test_psnr_hand_case() -> None:
    target = torch.zeros(2, 1, 4, 4)
    estimate = target.clone()
    estimate[0] += 0.1  # MSE 0.01 -> 10 log10(4 / 0.01)
    values = psnr(estimate, target)
    assert values.shape == (2,)
    assert values[0].item() == pytest.approx(10 * np.log10(400.0), abs=1e-4)
    assert torch.isinf(values[1])
    assert psnr(estimate, target, data_range=1.0)[0].item() == pytest.approx(20.0, abs=1e-4)


# ------------------------------------- FID ----------------------------------------------


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric() -> None:
    a = gaussian(500, 16, seed=0)
    b = gaussian(400, 16, seed=1, mean=0.3, scale=1.5)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(torch.from_numpy(a), b) == pytest.approx(frechet_distance(a, b), rel=1e-12)


def test_fid_matches_closed_form_for_known_gaussians() -> None:
    dim = 6
    rng = np.random.default_rng(3)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    std_a, std_b = np.linspace(0.5, 2.0, dim), np.linspace(1.5, 0.2, dim)
    mean_a, mean_b = rng.normal(size=dim), rng.normal(size=dim)
    # covariances R diag(s^2) R^T share eigenvectors, so
    # FID = |mu_a - mu_b|^2 + sum_i (s_a,i - s_b,i)^2
    a = with_exact_moments(300, mean_a, rotation * std_a, seed=4)
    b = with_exact_moments(200, mean_b, rotation * std_b, seed=5)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((std_a - std_b) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_fid_matches_scipy_sqrtm_on_general_covariances() -> None:
    rng = np.random.default_rng(6)
    a = gaussian(400, 10, seed=7) @ rng.normal(size=(10, 10))
    b = gaussian(300, 10, seed=8) @ rng.normal(size=(10, 10)) + 1.0
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (
        np.sum((a.mean(0) - b.mean(0)) ** 2)
        + np.trace(cov_a)
        + np.trace(cov_b)
        - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real)
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_fid_matches_torchmetrics_with_identity_feature_extractor() -> None:
    fid_module = pytest.importorskip("torchmetrics.image.fid")

    class Identity(torch.nn.Module):
        num_features = 12  # tells torchmetrics the feature size, so it never builds Inception

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    a = gaussian(300, 12, seed=9)
    b = gaussian(250, 12, seed=10, mean=0.2, scale=0.8)
    reference = fid_module.FrechetInceptionDistance(feature=Identity())
    reference.update(torch.from_numpy(a), real=True)
    reference.update(torch.from_numpy(b), real=False)
    assert frechet_distance(a, b) == pytest.approx(float(reference.compute()), rel=1e-6)


def test_fid_handles_singular_covariance() -> None:
    a = gaussian(200, 8, seed=11)
    a[:, 3] = 0.0  # a dead unit: singular covariance
    b = a + 0.01  # same covariance, means differ by 0.01 in each of the 8 dimensions
    # sqrt of the zero eigenvalue's rounding error (~1e-16) limits the accuracy to ~1e-8
    assert frechet_distance(a, b) == pytest.approx(8 * 1e-4, abs=1e-6)


def test_fid_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(gaussian(1, 4, 0), gaussian(5, 4, 1))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(gaussian(5, 4, 0), gaussian(5, 3, 1))


# ------------------------------------- KID ----------------------------------------------


def test_kid_near_zero_for_one_distribution_and_positive_otherwise() -> None:
    a = gaussian(1000, 16, seed=12)
    same = gaussian(1000, 16, seed=13)
    shifted = gaussian(1000, 16, seed=14, mean=0.5)
    self_mean, _ = kernel_inception_distance(a, a, subsets=20, subset_size=500, seed=0)
    same_mean, same_std = kernel_inception_distance(a, same, subsets=20, subset_size=500, seed=0)
    shifted_mean, _ = kernel_inception_distance(a, shifted, subsets=20, subset_size=500, seed=0)
    # a set against itself: the drawn subsets overlap, whose shared points make the
    # unbiased estimate slightly negative; both are tiny next to a real difference
    assert shifted_mean > 0.5
    assert abs(self_mean) < 0.03 * shifted_mean
    assert abs(same_mean) < 0.03 * shifted_mean and same_std > 0


def test_kid_matches_direct_unbiased_estimate_on_full_sets() -> None:
    x, y = gaussian(30, 5, seed=15), gaussian(30, 5, seed=16, mean=0.3)
    kernel = lambda u, v: (u @ v.T / 5 + 1) ** 3  # noqa: E731
    m = 30
    off_diagonal = 1 - np.eye(m)
    expected = (
        (kernel(x, x) * off_diagonal).sum() / (m * (m - 1))
        + (kernel(y, y) * off_diagonal).sum() / (m * (m - 1))
        - 2 * kernel(x, y).mean()
    )
    # one subset of the full size is a permutation of the sets: the same estimate
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=1000, seed=0)
    assert mean == pytest.approx(expected, rel=1e-10) and std == 0.0


def test_kid_is_reproducible_and_validates() -> None:
    a, b = gaussian(50, 4, 0), gaussian(60, 4, 1)
    assert kernel_inception_distance(a, b, 5, 20, seed=3) == kernel_inception_distance(a, b, 5, 20, seed=3)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(a[:1], b)


# -------------------------------------- IS ----------------------------------------------


def test_inception_score_extremes() -> None:
    confident_balanced = np.eye(10)[np.arange(1000) % 10]
    assert inception_score(confident_balanced) == pytest.approx(10.0)
    assert inception_score(confident_balanced, splits=10) == pytest.approx(10.0)
    assert inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0)
    assert inception_score(np.eye(10)[np.zeros(50, dtype=int)]) == pytest.approx(1.0)  # mode collapse
    with pytest.raises(ValueError, match="probability"):
        inception_score(np.full((4, 10), 0.2))


# ------------------------------- precision / recall -------------------------------------


def test_precision_recall_same_and_disjoint_distributions() -> None:
    real, fake = gaussian(1000, 8, seed=17), gaussian(1000, 8, seed=18)
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.8 and recall > 0.8
    far = gaussian(1000, 8, seed=19, mean=10.0)
    assert precision_recall(real, far, k=3) == (0.0, 0.0)


def test_precision_recall_detects_mode_dropping() -> None:
    real = gaussian(1000, 2, seed=20)
    half = real[real[:, 0] > 0] + 0.0  # covers only half of the real distribution
    precision, recall = precision_recall(real, half, k=3)
    assert precision > 0.95 and 0.3 < recall < 0.7


def test_precision_recall_chunking_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    real, fake = gaussian(300, 5, seed=21), gaussian(250, 5, seed=22, mean=0.4)
    expected = precision_recall(real, fake, k=3)
    monkeypatch.setattr(metrics, "PR_CHUNK", 64)
    assert precision_recall(real, fake, k=3) == expected
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3) == expected


def test_precision_recall_needs_more_than_k_samples() -> None:
    with pytest.raises(ValueError, match="more than k = 3"):
        precision_recall(gaussian(3, 4, 0), gaussian(10, 4, 1), k=3)


# ---------------------------- nearest neighbours ----------------------------------------


def test_nearest_neighbours_find_copies_and_match_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    support, queries = gaussian(500, 6, seed=31) * 100, gaussian(40, 6, seed=32) * 100
    queries[:5] = support[[7, 100, 250, 3, 499]]  # exact copies of training points
    distances, indices = nearest_neighbours(queries, support, k=3)
    assert distances.shape == indices.shape == (40, 3)
    assert indices[:5, 0].tolist() == [7, 100, 250, 3, 499]
    assert np.all(distances[:5, 0] == 0)
    brute = np.linalg.norm(queries[:, None, :] - support[None, :, :], axis=2)
    order = np.argsort(brute, axis=1)[:, :3]
    assert np.array_equal(indices, order)
    assert np.allclose(distances, np.take_along_axis(brute, order, axis=1), rtol=1e-12, atol=0)
    assert np.all(np.diff(distances, axis=1) >= 0)
    monkeypatch.setattr(metrics, "PR_CHUNK", 1)  # blocks of 20 query rows: same answer
    again = nearest_neighbours(torch.from_numpy(queries), torch.from_numpy(support), k=3)
    assert np.array_equal(again[1], indices) and np.array_equal(again[0], distances)


def test_nearest_neighbours_validate_k_and_dimensions() -> None:
    with pytest.raises(ValueError, match="k must be between 1 and the support size 4"):
        nearest_neighbours(gaussian(2, 3, 0), gaussian(4, 3, 1), k=5)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        nearest_neighbours(gaussian(2, 3, 0), gaussian(4, 2, 1))


# ---------------------------- class balance / TV ----------------------------------------


def test_class_balance_and_total_variation_hand_cases() -> None:
    probs = np.zeros((4, 10))
    probs[[0, 1, 2, 3], [3, 3, 7, 0]] = 1.0
    balance = class_balance(probs)
    np.testing.assert_allclose(balance, [0.25, 0, 0, 0.5, 0, 0, 0, 0.25, 0, 0])
    assert total_variation(balance, balance) == 0.0
    uniform = np.full(10, 0.1)
    # 0.5 * (0.15 + 0.4 + 0.15 + 7 * 0.1)
    assert total_variation(balance, uniform) == pytest.approx(0.7)
    assert total_variation(np.eye(10)[0], np.eye(10)[1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        total_variation(np.ones(3) / 3, np.ones(2) / 2)


# ------------------------------- quality_metrics ----------------------------------------


def test_quality_metrics_keys_and_values() -> None:
    rng = np.random.default_rng(23)
    feats, ref_feats = gaussian(200, 8, seed=24), gaussian(300, 8, seed=25)
    probs = rng.dirichlet(np.ones(10), size=200)
    ref_probs = rng.dirichlet(np.ones(10), size=300)
    result = quality_metrics(feats, probs, ref_feats, ref_probs, seed=0)
    expected_keys = {"fid", "kid_mean", "kid_std", "inception_score", "precision", "recall", "class_tv", "n_samples"}
    expected_keys |= {f"class_fraction_{digit}" for digit in range(10)}
    assert set(result) == expected_keys
    assert result["n_samples"] == 200
    assert result["fid"] == pytest.approx(frechet_distance(feats, ref_feats))
    assert sum(result[f"class_fraction_{digit}"] for digit in range(10)) == pytest.approx(1.0)
    assert 1.0 <= result["inception_score"] <= 10.0
    assert 0.0 <= result["class_tv"] <= 1.0
    with pytest.raises(ValueError, match="same number of rows"):
        quality_metrics(feats, probs[:10], ref_feats, ref_probs, seed=0)
    with pytest.raises(ValueError, match="more than k"):
        quality_metrics(feats[:3], probs[:3], ref_feats, ref_probs, seed=0)


def test_quality_metrics_kid_subsets_are_at_most_half_the_smaller_set() -> None:
    rng = np.random.default_rng(26)
    feats, ref_feats = gaussian(200, 8, seed=27, mean=0.3), gaussian(300, 8, seed=28)
    probs, ref_probs = rng.dirichlet(np.ones(10), size=200), rng.dirichlet(np.ones(10), size=300)
    result = quality_metrics(feats, probs, ref_feats, ref_probs, seed=5)
    # 200 fake images: subsets of 100 (not all 200, which would repeat one set in every round)
    expected = kernel_inception_distance(feats, ref_feats, subset_size=100, seed=5)
    assert (result["kid_mean"], result["kid_std"]) == expected
    assert result["kid_std"] > 0
