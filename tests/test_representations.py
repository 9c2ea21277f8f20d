"""Representations: every feature checked against a plain per-matrix numpy reference.

The references below are written from the definitions in README.md ("Representations": the table
and its conventions), one matrix at a time, in float64, with
numpy's own SVD, quantiles, histogram and FFT; they share no code with the script.  The
inputs are random float32 matrices of the shapes real Stable Diffusion v1.5 LoRA tensors
have (rank-1 and rank-4 factors of 320-, 640-, 768- and 1280-wide projections).
"""

import math
import time

import numpy as np
import pytest
import torch

import visual_ablation_experiment_optimized as vae
from helpers import cli_args, edited_script, results_of

EPS = 1e-8
TOP_K = 10
BINS = 50
RANK_BASED_QS = (0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99)
DISTRIBUTION_QS = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)

# (rows, cols) of real SD v1.5 LoRA tensors: down is (rank, in_features), up is (out_features, rank)
SD_SHAPES = [(1, 320), (320, 1), (4, 640), (1280, 4), (4, 768)]
# not a LoRA shape: more than ten singular values, so "top 10" and "nuclear = sum of all" differ
WIDE_SHAPE = (12, 20)
SHAPES = SD_SHAPES + [WIDE_SHAPE]

WIDTHS = {
    "simple_stats": 5, "rank_based": 11, "stats": 7, "spectral": 32, "matrix_norms": 7,
    "distribution": 12, "frequency": 14, "info_theoretic": 2, "ensemble": 67,
}
# float32 computation against a float64 reference
RTOL, ATOL = 1e-4, 1e-5


def shape_id(shape):
    return f"{shape[0]}x{shape[1]}"


def random_matrices(shape, n=4, seed=0):
    """n float32 matrices of a shape, LoRA-like scale with a non-zero mean (so std/|mean| is well defined)."""
    rng = np.random.default_rng([seed, *shape])
    return (0.01 + 0.05 * rng.standard_normal((n, *shape))).astype(np.float32)


def script_features(name, matrices):
    return vae.MATRIX_REPRESENTATIONS[name](vae.MatrixBatch(torch.from_numpy(matrices))).numpy()


def assert_features_close(got, want, names, rtol=RTOL, atol=ATOL):
    """Like assert_allclose, but the message names the features that differ."""
    assert got.shape == want.shape, f"shape {got.shape}, expected {want.shape}"
    bad = ~np.isclose(got, want, rtol=rtol, atol=atol)
    if bad.any():
        lines = [f"matrix {i}, feature {j} ({names[j]}): expected {want[i, j]!r}, got {got[i, j]!r}"
                 for i, j in zip(*np.nonzero(bad))]
        raise AssertionError(f"{len(lines)} features differ:\n" + "\n".join(lines[:40]))


# --- the numpy references, one matrix at a time -----------------------------------------------

def _flat(m):
    return np.asarray(m, dtype=np.float64).ravel()


def _skew_kurtosis(x):
    z = (x - x.mean()) / (np.std(x, ddof=1) + EPS)
    return np.mean(z ** 3), np.mean(z ** 4)


def ref_simple_stats(m):
    x = _flat(m)
    return [np.sqrt(np.sum(x ** 2)), x.mean(), np.std(x, ddof=1), x.max(), x.min()]


def ref_rank_based(m):
    q = np.quantile(_flat(m), RANK_BASED_QS, method="linear")
    return [*q, q[5] - q[3], q[8] - q[0]]


def ref_stats(m):
    x = _flat(m)
    lower_median = np.sort(x)[(x.size - 1) // 2]
    return [x.mean(), np.std(x, ddof=1), lower_median, x.min(), x.max(), *_skew_kurtosis(x)]


def ref_spectrum(s):
    """The 32 spectrum features of the true singular values s (descending)."""
    s = np.asarray(s, dtype=np.float64)
    top = np.zeros(TOP_K)
    top[:min(TOP_K, s.size)] = s[:TOP_K]
    normalised = top / (top.sum() + EPS)
    gaps = (top[:-1] - top[1:]) / (top[:-1] + EPS)
    entropy = -np.sum(normalised * np.log(normalised + EPS))
    true_top = s[:TOP_K]
    condition = true_top[0] / (true_top[-1] + EPS)  # the corrected definition: no padding
    return [*top, *normalised, *gaps, entropy, condition, s.sum()]


def ref_spectral(m):
    return ref_spectrum(np.linalg.svd(np.asarray(m, dtype=np.float64), compute_uv=False))


def ref_matrix_norms(m):
    a = np.asarray(m, dtype=np.float64)
    s = np.linalg.svd(a, compute_uv=False)
    fro = np.sqrt(np.sum(a ** 2))
    nuclear, spectral_norm = s.sum(), s[0]
    max_col = np.abs(a).sum(axis=0).max()
    max_row = np.abs(a).sum(axis=1).max()
    return [fro, nuclear, spectral_norm, max_col, max_row, nuclear / (fro + EPS), spectral_norm / (fro + EPS)]


def ref_distribution(m):
    x = _flat(m)
    q = np.quantile(x, DISTRIBUTION_QS, method="linear")
    mad = np.mean(np.abs(x - x.mean()))
    cv = np.std(x, ddof=1) / (abs(x.mean()) + EPS)
    return [*q, q[4] - q[2], mad, cv, *_skew_kurtosis(x)]


def ref_frequency(m):
    mag = np.abs(np.fft.fft2(np.asarray(m, dtype=np.float64))).ravel()
    top = np.zeros(TOP_K)
    descending = np.sort(mag)[::-1][:TOP_K]
    top[:descending.size] = descending
    share = np.sum(top ** 2) / (np.sum(mag ** 2) + EPS)
    return [*top, mag.mean(), np.std(mag, ddof=1), mag.max(), share]


def ref_flat_vec(m):
    return _flat(m)


def ref_info_theoretic(m):
    x = _flat(m)
    counts, _ = np.histogram(x, bins=BINS, range=(x.min(), x.max()))
    p = counts / counts.sum()
    p = p[p > 0]
    entropy = -np.sum(p * np.log(p))
    return [entropy, entropy / math.log(BINS)]


def ref_ensemble(m):
    return [*ref_spectral(m), *ref_matrix_norms(m), *ref_distribution(m), *ref_frequency(m),
            *ref_info_theoretic(m)]


REFERENCES = {
    "simple_stats": ref_simple_stats, "rank_based": ref_rank_based, "stats": ref_stats,
    "spectral": ref_spectral, "matrix_norms": ref_matrix_norms, "distribution": ref_distribution,
    "frequency": ref_frequency, "flat_vec": ref_flat_vec, "info_theoretic": ref_info_theoretic,
    "ensemble": ref_ensemble,
}

SPECTRUM_NAMES = ([f"s{i}" for i in range(TOP_K)] + [f"s{i}/sum" for i in range(TOP_K)]
                  + [f"gap{i}" for i in range(TOP_K - 1)] + ["entropy", "condition", "nuclear"])
FEATURE_NAMES = {
    "simple_stats": ["frobenius", "mean", "std", "max", "min"],
    "rank_based": [f"q{q:g}" for q in RANK_BASED_QS] + ["iqr", "range"],
    "stats": ["mean", "std", "median", "min", "max", "skewness", "kurtosis"],
    "spectral": SPECTRUM_NAMES,
    "matrix_norms": ["frobenius", "nuclear", "spectral", "max_col_abs_sum", "max_row_abs_sum",
                     "nuclear/frobenius", "spectral/frobenius"],
    "distribution": [f"q{q:g}" for q in DISTRIBUTION_QS] + ["iqr", "mad", "cv", "skewness", "kurtosis"],
    "frequency": [f"fft_top{i}" for i in range(TOP_K)] + ["fft_mean", "fft_std", "fft_max", "energy_share"],
    "info_theoretic": ["histogram_entropy", "histogram_entropy/ln50"],
}
FEATURE_NAMES["ensemble"] = [f"{part}.{n}" for part in ("spectral", "matrix_norms", "distribution",
                                                          "frequency", "info_theoretic")
                             for n in FEATURE_NAMES[part]]


def reference_features(name, matrices):
    return np.array([REFERENCES[name](m) for m in matrices], dtype=np.float64)


def tolerances(name, names):
    """Per-feature (rtol, atol): float32 everywhere; a histogram count may differ by one value
    lying on a bin edge (float32 vs float64 binning), which moves the entropy by about 1e-3."""
    atol = np.array([1e-3 if "histogram_entropy" in n else ATOL for n in names])
    return RTOL, atol


# --- every representation against its reference -----------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", list(REFERENCES))
def test_representation_matches_its_numpy_reference(name, shape):
    matrices = random_matrices(shape)
    got = script_features(name, matrices)
    want = reference_features(name, matrices)
    names = FEATURE_NAMES.get(name, [f"w{i}" for i in range(want.shape[1])])
    assert got.shape == (len(matrices), shape[0] * shape[1] if name == "flat_vec" else WIDTHS[name])  # README's widths
    rtol, atol = tolerances(name, names)
    assert_features_close(got, want, names, rtol=rtol, atol=atol)


def test_ensemble_is_spectral_norms_distribution_frequency_and_information_concatenated():
    matrices = torch.from_numpy(random_matrices((4, 640), n=5))
    parts = [vae.MATRIX_REPRESENTATIONS[n](vae.MatrixBatch(matrices))
             for n in ("spectral", "matrix_norms", "distribution", "frequency", "info_theoretic")]
    assert torch.equal(vae.MATRIX_REPRESENTATIONS["ensemble"](vae.MatrixBatch(matrices)), torch.cat(parts, 1))


def test_median_is_the_lower_middle_value_not_the_average_of_the_two():
    matrices = np.array([[[1.0, 2.0, 3.0, 10.0]]], dtype=np.float32)
    median = script_features("stats", matrices)[0, 2]
    assert median == 2.0


# --- singular values ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_singular_values_match_numpy_svd_in_descending_order(shape):
    matrices = random_matrices(shape, n=5)
    got = vae.singular_values(torch.from_numpy(matrices)).numpy()
    want = np.linalg.svd(matrices.astype(np.float64), compute_uv=False)
    assert got.shape == (5, min(shape))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def orthonormal_columns(rng, rows, cols):
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def factor_with_singular_values(rng, rows, cols, values):
    """A (rows, cols) float32 matrix U diag(values) V^T with orthonormal U, V."""
    k = len(values)
    u, v = orthonormal_columns(rng, rows, k), orthonormal_columns(rng, cols, k)
    return ((u * np.asarray(values)) @ v.T).astype(np.float32)


@pytest.mark.parametrize("shape", [(4, 640), (1280, 4)], ids=shape_id)
def test_singular_values_of_an_ill_conditioned_factor_keep_their_relative_accuracy(shape):
    # a Gram matrix squares 1e-7 to 1e-14, next to rounding errors of ~1e-16: the fallback SVD must
    # recover it; the well-conditioned matrix beside it in the batch must be left correct too
    rng = np.random.default_rng(7)
    matrices = np.stack([
        factor_with_singular_values(rng, *shape, [1.0, 0.7, 0.4, 0.2]),
        factor_with_singular_values(rng, *shape, [1.0, 0.5, 1e-3, 1e-7]),
        factor_with_singular_values(rng, *shape, [1.0, 1.0, 1e-7, 1e-7]),
    ])
    got = vae.singular_values(torch.from_numpy(matrices)).numpy().astype(np.float64)
    want = np.linalg.svd(matrices.astype(np.float64), compute_uv=False)
    assert want[1, -1] < 2e-7 and want[2, -1] < 2e-7  # the float32 inputs really are that ill-conditioned
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(4, 640), (1280, 4), (1, 320)], ids=shape_id)
def test_singular_values_of_a_zero_matrix_are_zeros_not_nan(shape):
    values = vae.singular_values(torch.zeros(2, *shape)).numpy()
    assert values.shape == (2, min(shape))
    assert np.array_equal(values, np.zeros_like(values))


@pytest.mark.parametrize("shape", [(4, 640), (1280, 4), (4, 768)], ids=shape_id)
def test_spectral_condition_number_of_a_rank_4_factor_is_largest_over_smallest_true_value(shape):
    # the original padded the spectrum to ten values first, which made this always 1.0 for rank 4
    rng = np.random.default_rng(3)
    matrices = np.stack([factor_with_singular_values(rng, *shape, [4.0, 3.0, 2.0, 1.0]),
                         factor_with_singular_values(rng, *shape, [0.5, 0.4, 0.2, 0.05])])
    condition = script_features("spectral", matrices)[:, SPECTRUM_NAMES.index("condition")]
    np.testing.assert_allclose(condition, [4.0, 10.0], rtol=1e-4)


# --- quantiles ------------------------------------------------------------------------------

def test_quantiles_work_past_torch_quantile_size_limit_and_match_numpy():
    # torch.quantile refuses rows of more than 2**24 values; one row just past it, N = 1
    rng = np.random.default_rng(11)
    x = rng.standard_normal(2 ** 24 + 1, dtype=np.float32)
    batch = vae.MatrixBatch(torch.from_numpy(x).view(1, 1, -1))
    start = time.perf_counter()
    got = batch.quantiles(RANK_BASED_QS).numpy()
    elapsed = time.perf_counter() - start
    want = np.quantile(x.astype(np.float64), RANK_BASED_QS, method="linear")
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
    # one sort: about 2 s on an idle 2-core CPU, up to 4.5 s seen with other work on it; a bound
    # that still fails a sort per quantile (9x) or any Python loop over the values
    assert elapsed < 10.0, f"quantiles of 2**24 + 1 values took {elapsed:.1f} s"


@pytest.mark.parametrize("shape", SD_SHAPES, ids=shape_id)
def test_quantiles_of_a_batch_interpolate_linearly_like_numpy(shape):
    matrices = random_matrices(shape, n=6)
    got = vae.MatrixBatch(torch.from_numpy(matrices)).quantiles((0.0, 0.013, 0.5, 0.777, 1.0)).numpy()
    want = np.stack([np.quantile(m.astype(np.float64), (0.0, 0.013, 0.5, 0.777, 1.0)) for m in matrices])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# --- delta_spectral -------------------------------------------------------------------------

def delta_features(down, up, scale=None):
    pair = vae.PairBatch(vae.MatrixBatch(torch.from_numpy(down)), vae.MatrixBatch(torch.from_numpy(up)),
                         None if scale is None else torch.tensor(scale, dtype=torch.float32))
    return vae.PAIR_REPRESENTATIONS["delta_spectral"](pair).numpy()


def update_spectrum(down, up):
    """Singular values of the formed update up @ down (a full SVD), cut to its rank r: the remaining
    min(out, in) - r are exactly zero (numerically ~1e-16 * s0), checked here.  torch's SVD on one
    thread rather than numpy's only for speed: a multithreaded LAPACK (numpy's OpenBLAS or torch's
    MKL) on a busy 2-core machine took seconds per 320 x 768 matrix instead of ~20 ms."""
    r = down.shape[0]
    update = torch.from_numpy(up.astype(np.float64) @ down.astype(np.float64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = torch.linalg.svdvals(update).numpy()
    finally:
        torch.set_num_threads(threads)
    assert np.all(s[r:] < 1e-10 * s[0])
    return s[:r]


# (rank, in_features, out_features) of SD v1.5 attention projections: attn1 to_q of the 320- and
# 640-wide blocks, attn2 to_v reading the 768-d text context; the 1280-wide ones are left out only
# because the reference SVD of a formed 1280 x 1280 update takes seconds
DELTA_SHAPES = [(1, 320, 320), (4, 320, 320), (4, 640, 640), (1, 768, 320), (4, 768, 320)]


@pytest.mark.parametrize("rank,fan_in,fan_out", DELTA_SHAPES, ids=lambda v: str(v))
def test_delta_spectral_equals_spectrum_features_of_the_formed_update(rank, fan_in, fan_out):
    rng = np.random.default_rng([rank, fan_in, fan_out])
    n = 3
    down = (0.05 * rng.standard_normal((n, rank, fan_in))).astype(np.float32)
    up = (0.05 * rng.standard_normal((n, fan_out, rank))).astype(np.float32)
    want = np.array([ref_spectrum(update_spectrum(d, u)) for d, u in zip(down, up)])
    assert_features_close(delta_features(down, up), want, SPECTRUM_NAMES)


def test_delta_spectral_scale_multiplies_the_singular_values_by_its_absolute_value():
    rng = np.random.default_rng(5)
    down = (0.05 * rng.standard_normal((3, 4, 320))).astype(np.float32)
    up = (0.05 * rng.standard_normal((3, 640, 4))).astype(np.float32)
    scale = [2.0, -0.5, 1.0]
    want = np.array([ref_spectrum(abs(c) * update_spectrum(d, u)) for d, u, c in zip(down, up, scale)])
    got = delta_features(down, up, scale)
    assert_features_close(got, want, SPECTRUM_NAMES)
    assert not np.allclose(got[:2], delta_features(down, up)[:2])  # the scale did change something


def test_delta_spectral_of_well_conditioned_factors_needs_no_qr(monkeypatch):
    """QR of a tall factor is a loop per matrix on CUDA: the spectrum comes from r x r matrices."""
    def no_qr(*args, **kwargs):
        raise AssertionError("QR of a factor")

    rng = np.random.default_rng(6)
    down = (0.05 * rng.standard_normal((3, 4, 320))).astype(np.float32)
    up = (0.05 * rng.standard_normal((3, 1280, 4))).astype(np.float32)
    want = np.array([ref_spectrum(update_spectrum(d, u)) for d, u in zip(down, up)])
    monkeypatch.setattr(torch.linalg, "qr", no_qr)
    assert_features_close(delta_features(down, up), want, SPECTRUM_NAMES)


@pytest.mark.parametrize("tiny", [1e-4, 1e-7, 0.0], ids=["small", "below_the_gram_floor", "rank_deficient"])
def test_delta_spectral_keeps_small_singular_values_of_ill_conditioned_factors(tiny):
    rng = np.random.default_rng(7)
    down = 0.05 * rng.standard_normal((2, 4, 320))
    up = 0.05 * rng.standard_normal((2, 640, 4))
    up[:, :, 3] = up[:, :, 2] + tiny * up[:, :, 3]  # one direction of up almost (or exactly) repeats another
    want = np.array([update_spectrum(d, u) if tiny else np.linalg.svd(u @ d, compute_uv=False)[:4]
                     for d, u in zip(down, up)])
    pair = vae.PairBatch(vae.MatrixBatch(torch.from_numpy(down)), vae.MatrixBatch(torch.from_numpy(up)))
    got = pair.delta_singular_values.double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * want.max())
    if tiny:
        assert got[:, -1] == pytest.approx(want[:, -1], rel=1e-4)  # the smallest value kept its digits


# --- delta_canonical and the factorisation ambiguity ------------------------------------------

def pair_features(name, down, up, scale=None):
    """A pair representation of float64 factors: invariances are checked without float32 inputs' rounding."""
    pair = vae.PairBatch(vae.MatrixBatch(torch.from_numpy(down)), vae.MatrixBatch(torch.from_numpy(up)),
                         None if scale is None else torch.tensor(scale, dtype=torch.float64))
    return vae.PAIR_REPRESENTATIONS[name](pair).numpy()


def canonical_parts(features, fan_out, fan_in):
    """delta_canonical's features split into U S^1/2 (N, out, r) and V S^1/2 (N, in, r), in float64."""
    rank = features.shape[1] // (fan_out + fan_in)
    u_part = features[:, :fan_out * rank].reshape(-1, fan_out, rank).astype(np.float64)
    v_part = features[:, fan_out * rank:].reshape(-1, fan_in, rank).astype(np.float64)
    return u_part, v_part


def random_factors(rank, fan_in, fan_out, n=3, seed=0):
    """n float64 (down, up) pairs of LoRA scale."""
    rng = np.random.default_rng([seed, rank, fan_in, fan_out])
    return 0.05 * rng.standard_normal((n, rank, fan_in)), 0.05 * rng.standard_normal((n, fan_out, rank))


def well_conditioned(rng, n, rank):
    """n random invertible r x r matrices with singular values in [0.5, 2]."""
    return np.stack([orthonormal_columns(rng, rank, rank) @ np.diag(rng.uniform(0.5, 2.0, rank))
                     @ orthonormal_columns(rng, rank, rank).T for _ in range(n)])


def assert_same_features(got, want):
    """Equal up to float32 rounding of float64 results (a float32 computation would miss by ~1e-5)."""
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())


# (rank, in_features, out_features): attn1 to_q of the 320-wide block, attn2 to_v of the 1280-wide one
INVARIANCE_SHAPES = [(4, 320, 320), (4, 768, 1280), (1, 320, 320)]


@pytest.mark.parametrize("name", list(vae.PAIR_REPRESENTATIONS))
@pytest.mark.parametrize("rank,fan_in,fan_out", INVARIANCE_SHAPES, ids=lambda v: str(v))
def test_pair_representation_is_unchanged_by_an_invertible_change_of_factor_basis(name, rank, fan_in, fan_out):
    down, up = random_factors(rank, fan_in, fan_out)
    g = well_conditioned(np.random.default_rng(1), len(down), rank)
    assert_same_features(pair_features(name, g @ down, up @ np.linalg.inv(g)), pair_features(name, down, up))


@pytest.mark.parametrize("rank,fan_in,fan_out", INVARIANCE_SHAPES, ids=lambda v: str(v))
def test_delta_canonical_is_unchanged_by_flipping_the_sign_of_a_factor_pair(rank, fan_in, fan_out):
    down, up = random_factors(rank, fan_in, fan_out)
    flipped_down, flipped_up = down.copy(), up.copy()
    flipped_down[:, 0] *= -1
    flipped_up[:, :, 0] *= -1
    flipped_down[:, -1] *= -1  # rank 1: the same pair flipped back, which must change nothing either
    flipped_up[:, :, -1] *= -1
    assert_same_features(pair_features("delta_canonical", flipped_down, flipped_up),
                         pair_features("delta_canonical", down, up))


@pytest.mark.parametrize("rank,fan_in,fan_out", DELTA_SHAPES, ids=lambda v: str(v))
def test_delta_canonical_part_norms_multiply_to_the_singular_values_of_the_formed_update(rank, fan_in, fan_out):
    down, up = random_factors(rank, fan_in, fan_out)
    scale = [2.0, -0.5, 1.0]
    u_part, v_part = canonical_parts(pair_features("delta_canonical", down, up, scale), fan_out, fan_in)
    got = np.linalg.norm(u_part, axis=1) * np.linalg.norm(v_part, axis=1)
    want = np.array([abs(c) * update_spectrum(d, u) for d, u, c in zip(down, up, scale)])
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("rank,fan_in,fan_out", INVARIANCE_SHAPES, ids=lambda v: str(v))
def test_delta_canonical_u_part_times_v_part_transposed_is_the_scaled_update(rank, fan_in, fan_out):
    down, up = random_factors(rank, fan_in, fan_out)
    scale = [2.0, -0.5, 1.0]
    u_part, v_part = canonical_parts(pair_features("delta_canonical", down, up, scale), fan_out, fan_in)
    update = np.asarray(scale)[:, None, None] * (up @ down)
    np.testing.assert_allclose(u_part @ v_part.transpose(0, 2, 1), update, rtol=0, atol=1e-6 * np.abs(update).max())


@pytest.mark.parametrize("rank,fan_in,fan_out", [(1, 320, 320), (1, 768, 1280), (4, 640, 640)], ids=lambda v: str(v))
def test_delta_canonical_has_out_plus_in_times_rank_features(rank, fan_in, fan_out):
    down, up = random_factors(rank, fan_in, fan_out)
    features = vae.PAIR_REPRESENTATIONS["delta_canonical"](vae.PairBatch(
        vae.MatrixBatch(torch.from_numpy(down).float()), vae.MatrixBatch(torch.from_numpy(up).float())))
    assert features.dtype == torch.float32
    assert features.shape == (3, (fan_out + fan_in) * rank)


def test_delta_canonical_makes_the_largest_entry_of_each_u_column_positive():
    down, up = random_factors(4, 320, 640, n=5)
    u_part, _ = canonical_parts(pair_features("delta_canonical", down, up, [1.0, -1.0, 2.0, -3.0, 0.5]), 640, 320)
    largest = np.take_along_axis(u_part, np.abs(u_part).argmax(1)[:, None], 1)
    assert (largest > 0).all()


def test_delta_canonical_breaks_a_tie_for_largest_entry_at_the_first_one():
    # u = (1, -1, 0, ...) / sqrt(2) exactly; each factorisation's rounding may make either entry the
    # larger, so an exact argmax would give either sign
    up = np.zeros((1, 320, 1))
    up[0, :2, 0] = [1.0, -1.0]
    down = np.random.default_rng(2).standard_normal((1, 1, 320))
    factors = np.geomspace(1e-3, 1e3, 12) * np.resize([1, -1], 12)
    features = [pair_features("delta_canonical", down / g, up * g) for g in factors]
    for got in features:
        u_part, _ = canonical_parts(got, 320, 320)
        assert u_part[0, 0, 0] > 0 and u_part[0, 1, 0] < 0
        assert_same_features(got, features[0])


def test_delta_canonical_of_a_batch_equals_each_module_computed_alone():
    down, up = random_factors(4, 768, 320, n=6)
    scale = [1.0, 2.0, -0.5, 0.25, 3.0, 1.5]
    alone = np.concatenate([pair_features("delta_canonical", down[i:i + 1], up[i:i + 1], scale[i:i + 1])
                            for i in range(len(down))])
    np.testing.assert_allclose(pair_features("delta_canonical", down, up, scale), alone, rtol=1e-6, atol=0)


def test_delta_canonical_of_a_zero_update_is_zeros():
    features = pair_features("delta_canonical", np.zeros((2, 4, 320)), np.zeros((2, 640, 4)))
    assert np.array_equal(features, np.zeros((2, (640 + 320) * 4), np.float32))


# --- degenerate matrices --------------------------------------------------------------------

@pytest.mark.parametrize("name", list(vae.MATRIX_REPRESENTATIONS))
def test_representation_of_a_zero_or_constant_matrix_is_finite(name):
    # every SD shape has more than one element, so the unbiased std is defined (0) everywhere
    for shape in SD_SHAPES:
        for fill in (0.0, 0.5):
            features = script_features(name, np.full((2, *shape), fill, dtype=np.float32))
            assert np.isfinite(features).all(), (shape, fill, np.argwhere(~np.isfinite(features)))


def test_delta_spectral_of_a_zero_update_is_finite():
    features = delta_features(np.zeros((2, 4, 320), np.float32), np.zeros((2, 320, 4), np.float32))
    assert np.isfinite(features).all()


# with one element the unbiased std divides by zero: exactly the features built on it are undefined
UNDEFINED_FOR_ONE_ELEMENT = {
    "simple_stats": {"std"},
    "stats": {"std", "skewness", "kurtosis"},
    "distribution": {"cv", "skewness", "kurtosis"},
    "frequency": {"fft_std"},
    "ensemble": {"distribution.cv", "distribution.skewness", "distribution.kurtosis", "frequency.fft_std"},
}


@pytest.mark.filterwarnings(r"ignore:std\(\):UserWarning")  # "degrees of freedom is <= 0"
@pytest.mark.parametrize("name", list(FEATURE_NAMES))
def test_single_element_matrix_is_undefined_only_in_features_built_on_the_unbiased_std(name):
    features = script_features(name, np.full((2, 1, 1), 0.5, dtype=np.float32))
    undefined = {FEATURE_NAMES[name][j] for j in np.nonzero(~np.isfinite(features).all(0))[0]}
    assert undefined == UNDEFINED_FOR_ONE_ELEMENT.get(name, set())


# --- the registry -------------------------------------------------------------------------------

NEW_REPRESENTATION = '''def abs_stats(b: MatrixBatch) -> torch.Tensor:
    """2: mean absolute value, largest absolute value."""
    return torch.stack([b.flat.abs().mean(1), b.flat.abs().amax(1)], 1)


'''


def test_a_new_representation_is_one_function_and_one_registry_line(tmp_path, tiny_dataset_path, capsys):
    registry = "# The registry: name -> (function"
    last_line = '    "delta_canonical": (delta_canonical, PairBatch),\n'
    edited = edited_script(tmp_path, "registry_edit", (registry, NEW_REPRESENTATION + registry),
                           (last_line, last_line + '    "abs_stats": (abs_stats, MatrixBatch),\n'))
    argv = cli_args(tmp_path, tiny_dataset_path, "--representations", "simple_stats,abs_stats", "--cache-features",
                    "--layer-groups", "all")
    assert edited.main(argv) == 0, capsys.readouterr().err[-2000:]
    simple_stats, abs_stats = results_of(tmp_path, tiny_dataset_path.name)["all_layers_results"]
    assert abs_stats["representation"] == "abs_stats_all_layers"
    assert abs_stats["feature_dim"] * 5 == simple_stats["feature_dim"] * 2  # 2 features per tensor, 5 for simple_stats
    assert abs_stats["num_successful_runs"] == len(abs_stats["per_run_results"]) == 2


def test_every_registered_representation_can_be_asked_for_and_the_defaults_are_registered():
    assert vae.parse_config(["--representations", ",".join(vae.REPRESENTATIONS)]).representations == \
        tuple(vae.REPRESENTATIONS)
    assert set(vae.DEFAULT_REPRESENTATIONS) <= set(vae.REPRESENTATIONS)


@pytest.mark.parametrize("name", list(vae.REPRESENTATIONS))
def test_each_registered_function_reads_the_batch_it_is_registered_with(name):
    function, batch = vae.REPRESENTATIONS[name]
    matrices = torch.from_numpy(random_matrices((4, 320), n=2))
    down, up = vae.MatrixBatch(matrices), vae.MatrixBatch(matrices.mT.contiguous())
    features = function(vae.PairBatch(down, up) if batch is vae.PairBatch else down)
    assert features.shape[0] == 2 and features.ndim == 2 and torch.isfinite(features).all()
