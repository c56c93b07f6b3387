"""Sample-quality metrics computed on classifier features, plus simple image metrics.

All distribution metrics take features / class probabilities produced once by
``diffusion.classifier.embed`` (numpy arrays or torch tensors) and work in float64.

References:
    PSNR       peak signal-to-noise ratio, 10 log10(range^2 / MSE).
    FID        Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge
               to a Local Nash Equilibrium", eq. for d^2((m, C), (m_w, C_w)).
    KID        Bińkowski et al., 2018, "Demystifying MMD GANs", unbiased MMD^2 (their eq. 2
               estimator) with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3.
    IS         Salimans et al., 2016, "Improved Techniques for Training GANs",
               exp(E_x KL(p(y|x) || p(y))), here with the MNIST classifier instead of Inception.
    Precision / recall   Kynkäänniemi et al., 2019, "Improved Precision and Recall Metric
               for Assessing Generative Models", k-NN-radius manifold estimate (eq. 1-3).
    Class balance / total variation   fraction of samples per predicted digit and
               TV(p, q) = 1/2 sum |p - q|.
    Nearest neighbours   k-NN in feature space, for the memorisation check of the plot stage.
    Conditional accuracy   of samples asked for a digit, the fraction the classifier reads as it.

Defaults of ``quality_metrics``: KID uses ``KID_SUBSETS = 100`` random subsets of
``min(KID_SUBSET_SIZE = 1000, min(n_fake, n_reference) // 2)`` samples per set (at least 2);
precision/recall use ``k = PR_K = 3`` nearest neighbours, as recommended by Kynkäänniemi et al.
"""

from __future__ import annotations

import numpy as np
import torch

# What ``quality_metrics`` returns besides n_samples: SCORES, one number each, and the fraction
# of samples per predicted digit. HEADLINE_SCORES are those a reader compares first (the
# evaluate stage's metrics.json, MLflow); kid_std and the fractions are detail.
SCORES = ("fid", "kid_mean", "kid_std", "inception_score", "precision", "recall", "class_tv")
HEADLINE_SCORES = tuple(score for score in SCORES if score != "kid_std")
CONDITIONAL_ACCURACY = "conditional_accuracy"  # a headline score too, of requested digits only
CLASS_FRACTIONS = tuple(f"class_fraction_{digit}" for digit in range(10))

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_K = 3
PR_CHUNK = 1000  # rows per torch.cdist call: 1000 x 10000 float64 distances = 80 MB

ArrayLike = np.ndarray | torch.Tensor


def _as_numpy64(values: ArrayLike, name: str, ndim: int = 2) -> np.ndarray:
    """Convert to a float64 numpy array of the given rank, with a clear error otherwise."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _check_pair(feats_a: np.ndarray, feats_b: np.ndarray, minimum: int, metric: str) -> None:
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(
            f"{metric}: feature dimensions differ ({feats_a.shape[1]} vs {feats_b.shape[1]})"
        )
    for name, feats in (("first", feats_a), ("second", feats_b)):
        if feats.shape[0] < minimum:
            raise ValueError(
                f"{metric}: the {name} set has {feats.shape[0]} samples; at least {minimum} are required"
            )


def _check_probs(probs: ArrayLike, name: str = "probs") -> np.ndarray:
    probs = _as_numpy64(probs, name)
    if probs.shape[0] < 1:
        raise ValueError(f"{name} is empty; at least 1 sample is required")
    if probs.min() < 0 or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError(f"{name} rows must be probability vectors (non-negative, summing to 1)")
    return probs


def psnr(estimate: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB: 10 log10(data_range^2 / MSE); images in [-1, 1] so range = 2.

    Returns a float tensor of shape (N,); identical images give +inf.
    """
    if estimate.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(estimate.shape)} vs {tuple(target.shape)}")
    error = (estimate.double() - target.double()).flatten(start_dim=1)
    mse = error.pow(2).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse)).float()


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via eigh (negative rounding clipped)."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID, Heusel et al. 2017).

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).
    tr((S_a S_b)^(1/2)) equals tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), whose argument is
    symmetric PSD, so it is computed from real eigenvalues (eigh) without complex
    rounding even when the covariances are singular (e.g. dead ReLU units).
    Covariances use the unbiased (n - 1) normalisation; needs >= 2 samples per set.
    """
    feats_a = _as_numpy64(feats_a, "feats_a")
    feats_b = _as_numpy64(feats_b, "feats_b")
    _check_pair(feats_a, feats_b, 2, "frechet_distance")
    mean_a, mean_b = feats_a.mean(axis=0), feats_b.mean(axis=0)
    cov_a = np.cov(feats_a, rowvar=False)
    cov_b = np.cov(feats_b, rowvar=False)
    sqrt_a = _sqrt_psd(cov_a)
    cross = sqrt_a @ cov_b @ sqrt_a
    cross = 0.5 * (cross + cross.T)  # re-symmetrise against rounding
    trace_sqrt_cross = np.sqrt(np.clip(np.linalg.eigvalsh(cross), 0.0, None)).sum()
    distance = (
        np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt_cross
    )
    return float(max(distance, 0.0))  # tiny negative values are rounding error


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 (Bińkowski et al. 2018).

    MMD^2_u = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1))
              - 2 sum_{i,j} k(x_i,y_j)/m^2.
    """
    m, dim = x.shape

    def kernel(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        base = u @ v.T / dim + 1.0
        return base * base * base  # faster than ** 3 on large matrices

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kernel_inception_distance(
    feats_a: ArrayLike,
    feats_b: ArrayLike,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): mean and std of the unbiased polynomial-kernel MMD^2.

    Each of ``subsets`` rounds draws ``min(subset_size, n_a, n_b)`` samples without
    replacement from each set (numpy Generator seeded with ``seed``). The std is the
    population standard deviation over rounds. The estimate can be slightly negative
    when both sets come from the same distribution.
    """
    feats_a = _as_numpy64(feats_a, "feats_a")
    feats_b = _as_numpy64(feats_b, "feats_b")
    _check_pair(feats_a, feats_b, 2, "kernel_inception_distance")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    size = min(subset_size, feats_a.shape[0], feats_b.shape[0])
    rng = np.random.default_rng(seed)
    estimates = np.empty(subsets)
    for round_index in range(subsets):
        x = feats_a[rng.choice(feats_a.shape[0], size, replace=False)]
        y = feats_b[rng.choice(feats_b.shape[0], size, replace=False)]
        estimates[round_index] = _polynomial_mmd2_unbiased(x, y)
    return float(estimates.mean()), float(estimates.std())


def inception_score(probs: ArrayLike, splits: int = 1) -> float:
    """Classifier Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016).

    p(y) is the mean of p(y|x) within each of ``splits`` equal chunks; the result is the
    mean score over chunks. Bounded by the number of classes (10 for MNIST).
    """
    probs = _check_probs(probs)
    if not 1 <= splits <= probs.shape[0]:
        raise ValueError(f"splits must be between 1 and the number of samples ({probs.shape[0]}), got {splits}")
    scores = []
    for chunk in np.array_split(probs, splits):
        marginal = chunk.mean(axis=0, keepdims=True)
        # 0 log 0 = 0: terms with p(y|x) = 0 contribute nothing
        ratio = np.divide(chunk, marginal, out=np.ones_like(chunk), where=chunk > 0)
        kl = np.sum(chunk * np.log(ratio), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def _as_torch64(values: ArrayLike, name: str) -> torch.Tensor:
    """Float64 2-D tensor; torch inputs keep their device, numpy inputs go to the CPU."""
    if isinstance(values, torch.Tensor):
        tensor = values.detach().double()
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be a 2-D array, got shape {tuple(tensor.shape)}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
        return tensor
    return torch.from_numpy(_as_numpy64(values, name))


def _knn_radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    radii = []
    for first in range(0, feats.shape[0], PR_CHUNK):
        distances = torch.cdist(feats[first : first + PR_CHUNK], feats)
        # the smallest distance is the point to itself (0), so take the (k+1)-th smallest
        radii.append(distances.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _fraction_inside(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of queries within radius_j of at least one support point j (eq. 1-2)."""
    inside = 0
    for first in range(0, queries.shape[0], PR_CHUNK):
        distances = torch.cdist(queries[first : first + PR_CHUNK], support)
        inside += int((distances <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real_feats: ArrayLike, fake_feats: ArrayLike, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points with radius = distance to
    the k-th nearest neighbour. Precision = fraction of fake samples inside the real
    manifold; recall = fraction of real samples inside the fake manifold. Distances are
    computed in float64 chunks with ``torch.cdist`` on the inputs' device (CPU for numpy).
    """
    real = _as_torch64(real_feats, "real_feats")
    fake = _as_torch64(fake_feats, "fake_feats").to(real.device)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: feature dimensions differ ({real.shape[1]} vs {fake.shape[1]})")
    for name, feats in (("real", real), ("fake", fake)):
        if feats.shape[0] <= k:
            raise ValueError(
                f"precision_recall: the {name} set has {feats.shape[0]} samples; more than k = {k} are required"
            )
    precision = _fraction_inside(fake, real, _knn_radii(real, k))
    recall = _fraction_inside(real, fake, _knn_radii(fake, k))
    return precision, recall


def nearest_neighbours(queries: ArrayLike, support: ArrayLike, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest support points of each query, by Euclidean distance in float64.

    Returns ``(distances, indices)``, both of shape (n_queries, k), nearest first. Used as a
    memorisation check: samples that lie much closer to the training images than unseen real
    images do hint at copies of the training set.
    """
    queries_64 = _as_torch64(queries, "queries")
    support_64 = _as_torch64(support, "support").to(queries_64.device)
    if queries_64.shape[1] != support_64.shape[1]:
        raise ValueError(f"nearest_neighbours: feature dimensions differ "
                         f"({queries_64.shape[1]} vs {support_64.shape[1]})")
    if not 1 <= k <= support_64.shape[0]:
        raise ValueError(f"k must be between 1 and the support size {support_64.shape[0]}, got {k}")
    distances, indices = [], []
    rows = max(1, PR_CHUNK * 10_000 // max(support_64.shape[0], 1))  # about 80 MB per block
    for first in range(0, queries_64.shape[0], rows):
        # Direct differences, not the |x|^2 + |y|^2 - 2 x.y matmul form: an exact copy then gets
        # distance 0 (the matmul form leaves ~1e-7), which is what the check looks for.
        block = torch.cdist(queries_64[first : first + rows], support_64,
                            compute_mode="donot_use_mm_for_euclid_dist").topk(k, dim=1, largest=False)
        distances.append(block.values.cpu())
        indices.append(block.indices.cpu())
    if not distances:
        return np.zeros((0, k)), np.zeros((0, k), dtype=np.int64)
    return torch.cat(distances).numpy(), torch.cat(indices).numpy()


def class_balance(probs: ArrayLike) -> np.ndarray:
    """Fraction of samples per predicted class (argmax of each row); shape (num_classes,)."""
    probs = _as_numpy64(probs, "probs")
    if probs.shape[0] < 1:
        raise ValueError("probs is empty; at least 1 sample is required")
    predicted = probs.argmax(axis=1)
    return np.bincount(predicted, minlength=probs.shape[1]).astype(np.float64) / probs.shape[0]


def conditional_accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    """The fraction of samples whose predicted class (argmax of each row) is the digit they were
    asked for, ``labels`` (N,)."""
    probs = _as_numpy64(probs, "probs")
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != probs.shape[0] or probs.shape[0] < 1:
        raise ValueError(f"conditional_accuracy: {probs.shape[0]} samples but {labels.shape[0]} "
                         "labels; give one label per sample")
    return float((probs.argmax(axis=1) == labels).mean())


def total_variation(p: ArrayLike, q: ArrayLike) -> float:
    """Total variation distance 1/2 sum |p - q| between two discrete distributions."""
    p = _as_numpy64(p, "p", ndim=1)
    q = _as_numpy64(q, "q", ndim=1)
    if p.shape != q.shape:
        raise ValueError(f"total_variation: shapes differ ({p.shape} vs {q.shape})")
    return float(0.5 * np.abs(p - q).sum())


def quality_metrics(
    fake_feats: ArrayLike,
    fake_probs: ArrayLike,
    ref_feats: ArrayLike,
    ref_probs: ArrayLike,
    *,
    seed: int,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    k: int = PR_K,
) -> dict[str, float]:
    """All sample-quality metrics of a (fake) set against a reference set.

    Returns ``fid``, ``kid_mean``, ``kid_std``, ``inception_score`` (of the fake set),
    ``precision``, ``recall``, ``class_tv`` (TV distance between the predicted-class
    balance of fake and reference), ``n_samples`` (fake set size) and
    ``class_fraction_0`` .. ``class_fraction_9`` (fake set). Needs more than ``k`` samples
    in each set (and at least 2).
    """
    fake_feats = _as_numpy64(fake_feats, "fake_feats")
    ref_feats = _as_numpy64(ref_feats, "ref_feats")
    fake_probs = _check_probs(fake_probs, "fake_probs")
    ref_probs = _check_probs(ref_probs, "ref_probs")
    if fake_feats.shape[0] != fake_probs.shape[0] or ref_feats.shape[0] != ref_probs.shape[0]:
        raise ValueError(
            "features and probabilities must have the same number of rows: "
            f"fake {fake_feats.shape[0]} vs {fake_probs.shape[0]}, "
            f"reference {ref_feats.shape[0]} vs {ref_probs.shape[0]}"
        )
    # Subsets as large as a whole set would be the same set in every round (kid_std = 0): cap
    # them at half the smaller set, so the rounds differ and kid_std shows the spread.
    half = min(fake_feats.shape[0], ref_feats.shape[0]) // 2
    kid_mean, kid_std = kernel_inception_distance(
        fake_feats, ref_feats, subsets=kid_subsets, subset_size=max(2, min(kid_subset_size, half)),
        seed=seed,
    )
    precision, recall = precision_recall(ref_feats, fake_feats, k=k)
    fake_balance = class_balance(fake_probs)
    results = {
        "fid": frechet_distance(fake_feats, ref_feats),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "inception_score": inception_score(fake_probs),
        "precision": precision,
        "recall": recall,
        "class_tv": total_variation(fake_balance, class_balance(ref_probs)),
        "n_samples": int(fake_feats.shape[0]),
    }
    results.update({f"class_fraction_{digit}": float(f) for digit, f in enumerate(fake_balance)})
    return results
