"""revkernels.stability: analytic conditions checked against direct simulation of the linear recurrences."""
import numpy as np
import pytest
import torch

from revkernels import stability as st

N_STEPS = 2000
BOUND = 1e3  # stable solutions here stay O(10); unstable ones grow by >= 1.01**2000 ~ 4e8


def run_three_term(a, w, n, p_prev, p_cur):
    """p[j+1] = a p[j-1] + w p[j], n steps; returns (peak |p|, last two states)."""
    with np.errstate(over="ignore", invalid="ignore"):
        peak = np.maximum(np.abs(p_prev), np.abs(p_cur))
        for _ in range(n):
            p_prev, p_cur = p_cur, a * p_prev + w * p_cur
            peak = np.maximum(peak, np.abs(p_cur))
    return peak, p_prev, p_cur


def run_three_term_inverse(a, w, n, p_next, p_cur):
    """p[j-1] = (p[j+1] - w p[j]) / a, n steps backward; returns (peak |p|, last two states)."""
    with np.errstate(over="ignore", invalid="ignore"):
        peak = np.maximum(np.abs(p_next), np.abs(p_cur))
        for _ in range(n):
            p_next, p_cur = p_cur, (p_next - w * p_cur) / a
            peak = np.maximum(peak, np.abs(p_cur))
    return peak, p_next, p_cur


def bounded(peak):
    return np.isfinite(peak) & (peak < BOUND)


def three_term_points():
    """(a, b, z) covering each |a| case: random z in a box, on the analytic segment, and just off it."""
    rng = np.random.default_rng(0)
    a_list, b_list, z_list = [], [], []
    for a, b in [(1.0, 0.0), (1.0, 0.3), (-1.0, 2.0), (-1.0, 0.5),
                 (0.5, 0.5), (-0.5, 1.5), (1.5, -0.5), (-1.5, 2.5)]:
        box = rng.uniform(-5, 3, 60) + 1j * rng.uniform(-3, 3, 60)
        t = rng.uniform(-2.6, 2.6, 40)
        off = rng.choice([-0.1, 0.1], 40)
        if a > 0:  # segment w = b + z in i(-2, 2)
            line, near = -b + 1j * t, -b + off + 1j * t
        else:      # segment w in (-2, 2)
            line, near = -b + t + 0j, -b + t + 1j * off
        z = np.concatenate([box, line, near])
        a_list.append(np.full(z.shape, a))
        b_list.append(np.full(z.shape, b))
        z_list.append(z)
    return np.concatenate(a_list), np.concatenate(b_list), np.concatenate(z_list)


def numpy_roots(a, b, z):
    return np.array([np.roots([1.0, -(bi + zi), -ai]) for ai, bi, zi in zip(a, b, z)])


def test_characteristic_roots_match_numpy_and_broadcast():
    a, b, z = three_term_points()
    r = st.characteristic_roots(a, b, z)
    ref = numpy_roots(a, b, z)
    assert r.shape == a.shape + (2,)
    # same multiset of roots (compare both orderings), larger modulus first, Vieta's formulas
    d = np.minimum(np.abs(r - ref).max(-1), np.abs(r - ref[:, ::-1]).max(-1))
    assert d.max() < 1e-6
    assert np.all(np.abs(r[:, 0]) >= np.abs(r[:, 1]) - 1e-12)
    np.testing.assert_allclose(r.sum(-1), b + z, atol=1e-12)
    np.testing.assert_allclose(r.prod(-1), -a, atol=1e-12)
    assert st.characteristic_roots(np.ones((3, 1)), 0.0, 1j * np.arange(4)).shape == (3, 4, 2)


def test_forward_backward_predicate_matches_simulation():
    a, b, z = three_term_points()
    w = b + z
    ref = np.abs(numpy_roots(a, b, z))
    rho_f, rho_b = ref.max(-1), 1.0 / ref.min(-1)
    # drop points whose growth is too slow to see in N_STEPS, or near a double root (large constants)
    ambiguous = ((rho_f > 1 + 1e-9) & (rho_f < 1.01)) | ((rho_b > 1 + 1e-9) & (rho_b < 1.01))
    ambiguous |= np.abs(w * w + 4 * a) < 0.2
    a, b, z, w = a[~ambiguous], b[~ambiguous], z[~ambiguous], w[~ambiguous]

    p_m1, p_0 = np.full(a.shape, 1.0 + 0j), np.full(a.shape, 0.3 + 0.7j)
    peak_f, p_nm1, p_n = run_three_term(a, w, N_STEPS, p_m1, p_0)
    peak_b, _, _ = run_three_term_inverse(a, w, N_STEPS, np.full(a.shape, -0.4 + 1j), np.full(a.shape, 0.9 + 0j))
    simulated = bounded(peak_f) & bounded(peak_b)
    predicted = st.is_forward_backward_stable(a, b, z)

    assert 100 < predicted.sum() < len(a) - 100  # both outcomes well represented
    bad = np.flatnonzero(predicted != simulated)
    assert bad.size == 0, [(a[i], b[i], z[i], peak_f[i], peak_b[i]) for i in bad[:5]]

    # on stable points the inverse recurrence is the exact inverse: it walks back to p[-1], p[0]
    s = predicted
    _, q_0, q_m1 = run_three_term_inverse(a[s], w[s], N_STEPS, p_n[s], p_nm1[s])
    np.testing.assert_allclose(q_m1, p_m1[s], atol=1e-8)
    np.testing.assert_allclose(q_0, p_0[s], atol=1e-8)


def test_forward_backward_implies_forward_stable_and_forward_region_matches_simulation():
    a, b, z = three_term_points()
    fb = st.is_forward_backward_stable(a, b, z)
    fwd = st.is_forward_stable(a, b, z)
    assert np.all(fwd[fb])
    # |a| < 1: forward region has interior; compare with a forward run
    keep = np.abs(a) < 1
    a, b, z, fwd = a[keep], b[keep], z[keep], fwd[keep]
    rho_f = np.abs(numpy_roots(a, b, z)).max(-1)
    clear = np.abs(rho_f - 1) > 0.01
    peak, _, _ = run_three_term(a[clear], (b + z)[clear], N_STEPS, 1.0 + 0j, 0.3 + 0.7j)
    assert 20 < fwd[clear].sum() < clear.sum() - 20
    np.testing.assert_array_equal(fwd[clear], bounded(peak))


@pytest.mark.parametrize("a,b,z", [(1.0, 0.0, 2j), (1.0, 0.0, -2j), (-1.0, 2.0, -4.0), (-1.0, 2.0, 0.0),
                                   (1.0, 0.3, -0.3 + 2j)])
def test_double_root_on_unit_circle_grows_linearly_and_is_unstable(a, b, z):
    assert not st.is_forward_backward_stable(a, b, z)
    assert not st.is_forward_stable(a, b, z)
    r = st.characteristic_roots(a, b, z)
    np.testing.assert_allclose(np.abs(r), 1.0, atol=1e-7)
    w = b + z
    peak1, _, _ = run_three_term(a, w, 1000, 1.0 + 0j, 0.3 + 0.7j)
    peak2, _, _ = run_three_term(a, w, 2000, 1.0 + 0j, 0.3 + 0.7j)
    assert 1.8 < peak2 / peak1 < 2.2  # linear, not exponential and not bounded
    assert peak2 > 100


@pytest.mark.parametrize("a,b,z", [(1.0, 0.0, -0.5), (1.0, 0.0, 0.1 + 1j), (1.0, 0.0, 2.5j),
                                   (-1.0, 2.0, 0.5), (-1.0, 2.0, -1 + 0.3j), (0.5, 0.5, 1j), (1.5, -0.5, -0.5)])
def test_roots_give_simulated_growth_rate(a, b, z):
    r = np.abs(st.characteristic_roots(a, b, z))
    n = 400
    w = b + z
    _, p1, p2 = run_three_term(a, w, n, 1.0 + 0j, 0.3 + 0.7j)
    _, q1, q2 = run_three_term_inverse(a, w, n, 1.0 + 0j, 0.3 + 0.7j)
    rate_f = np.log(max(abs(p1), abs(p2))) / n
    rate_b = np.log(max(abs(q1), abs(q2))) / n
    assert abs(rate_f - np.log(max(r.max(), 1.0))) < 0.02
    assert abs(rate_b - np.log(max(1.0 / r.min(), 1.0))) < 0.02


def test_paper_midpoint_and_leapfrog_regions():
    # midpoint p[j+1] = p[j-1] + 2h f: z = 2 h lam, stable iff lam imaginary and |h lam| < 1
    assert st.is_forward_backward_stable(1.0, 0.0, 2 * 0.99j)
    assert not st.is_forward_backward_stable(1.0, 0.0, 2 * 1.01j)
    assert not st.is_forward_backward_stable(1.0, 0.0, 2 * (1e-3 + 0.5j))
    # leapfrog p[j+1] = 2p[j] - p[j-1] + h^2 f: stable iff -4 < h^2 lam < 0
    assert st.is_forward_backward_stable(-1.0, 2.0, np.array([-3.99, -2.0, -0.01])).all()
    assert not st.is_forward_backward_stable(-1.0, 2.0, np.array([-4.01, 0.01, -2.0 + 1e-3j])).any()
    # |a| != 1 never
    assert not st.is_forward_backward_stable(np.array([0.999, 1.001, -0.5]), 0.0, 0.5j).any()


def run_hamiltonian(a, b, al, be, n, q, p):
    with np.errstate(over="ignore", invalid="ignore"):
        peak = np.maximum(np.abs(q), np.abs(p))
        for _ in range(n):
            q = a * q + al * p
            p = b * p + be * q
            peak = np.maximum(peak, np.maximum(np.abs(q), np.abs(p)))
    return peak, q, p


def run_hamiltonian_inverse(a, b, al, be, n, q, p):
    with np.errstate(over="ignore", invalid="ignore"):
        peak = np.maximum(np.abs(q), np.abs(p))
        for _ in range(n):
            p = (p - be * q) / b
            q = (q - al * p) / a
            peak = np.maximum(peak, np.maximum(np.abs(q), np.abs(p)))
    return peak, q, p


def hamiltonian_points():
    rng = np.random.default_rng(1)
    m = 150
    sgn = rng.choice([-1.0, 1.0], m)
    a = sgn * np.exp(rng.uniform(-1, 1, m))
    al = rng.uniform(-2, 2, m)
    al = np.where(np.abs(al) < 0.1, 0.5, al)
    be = rng.uniform(-2, 2, m)
    alc = al * np.exp(1j * rng.uniform(0, 2 * np.pi, m))
    y = rng.uniform(-2.5, 2.5, m)
    rows = [
        (a, 1 / a, al, be),                                      # ab = 1, real
        (a, -1 / a, al, be),                                     # ab = -1, generic real t
        (a, -1 / a, al, -(a - 1 / a) / al),                      # ab = -1, t = 0
        (a, 1 / a, alc, rng.uniform(0, 2, m) * np.conj(alc)),    # ab = 1, complex alpha, real alpha*beta
        (a, 1 / a, alc, be + 0j),                                # ab = 1, complex t
        (a, -1 / a, alc, (-(a - 1 / a) + 1j * y) / alc),         # ab = -1, t = i y
        (a, rng.uniform(0.2, 0.8, m), al, be),                   # |ab| != 1
    ]
    return [np.concatenate(c) for c in zip(*rows)]


def test_hamiltonian_matrix_is_one_step_and_eigenvalues():
    a, b, al, be = hamiltonian_points()
    M = st.hamiltonian_matrix(a, b, al, be)
    q0, p0 = 0.7 - 0.1j, -0.3 + 0.4j
    _, q1, p1 = run_hamiltonian(a, b, al, be, 1, q0, p0)
    np.testing.assert_allclose(M @ np.array([q0, p0]), np.stack([q1, p1], -1), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(M), a * b, atol=1e-9)
    np.testing.assert_allclose(np.trace(M, axis1=-2, axis2=-1), a + b + al * be, atol=1e-12)
    mu = st.hamiltonian_eigenvalues(a, b, al, be)
    ref = np.linalg.eigvals(M)
    d = np.minimum(np.abs(mu - ref).max(-1), np.abs(mu - ref[:, ::-1]).max(-1))
    assert d.max() < 1e-6


def test_hamiltonian_predicate_matches_simulation():
    a, b, al, be = hamiltonian_points()
    mu = np.abs(np.linalg.eigvals(st.hamiltonian_matrix(a, b, al, be)))
    rho_f, rho_b = mu.max(-1), 1 / mu.min(-1)
    t = a + b + al * be
    ambiguous = ((rho_f > 1 + 1e-9) & (rho_f < 1.01)) | ((rho_b > 1 + 1e-9) & (rho_b < 1.01))
    ambiguous |= np.abs(t * t - 4 * a * b) < 0.2
    a, b, al, be = a[~ambiguous], b[~ambiguous], al[~ambiguous], be[~ambiguous]
    peak_f, _, _ = run_hamiltonian(a, b, al, be, N_STEPS, 1.0 + 0j, 0.3 - 0.2j)
    peak_b, _, _ = run_hamiltonian_inverse(a, b, al, be, N_STEPS, 1.0 + 0j, 0.3 - 0.2j)
    simulated = bounded(peak_f) & bounded(peak_b)
    predicted = st.hamiltonian_is_stable(a, b, al, be)
    assert 100 < predicted.sum() < len(a) - 100
    bad = np.flatnonzero(predicted != simulated)
    assert bad.size == 0, [(a[i], b[i], al[i], be[i], peak_f[i], peak_b[i]) for i in bad[:5]]


@pytest.mark.parametrize("a,b,al,be,expect", [
    (1.0, -1.0, 1.0, 1.0, False),   # |ab| = 1, |t| = 1 <= 2 (paper's eq. 3.16 holds) but eigenvalues 1.618, -0.618
    (1.0, 1.0, 0.0, 0.0, True),     # t = 2 but M = I: bounded
    (-1.0, -1.0, 0.0, 0.0, True),   # M = -I
    (1.0, 1.0, 1.0, -4.0, False),   # t = -2, Jordan block at -1: linear growth
    (2.0, 0.5, 1.0, -1.0, True),    # ab = 1, t = 1.5
])
def test_hamiltonian_special_cases(a, b, al, be, expect):
    assert bool(st.hamiltonian_is_stable(a, b, al, be)) is expect
    peak_f, _, _ = run_hamiltonian(a, b, al, be, N_STEPS, 1.0, 0.3)
    peak_b, _, _ = run_hamiltonian_inverse(a, b, al, be, N_STEPS, 1.0, 0.3)
    assert bool(bounded(peak_f) & bounded(peak_b)) is expect


def test_sample_midpoint_a_distribution():
    n = 400_000
    x = st.sample_midpoint_a(n, generator=torch.Generator().manual_seed(3)).numpy()
    y = st.sample_midpoint_a(n, generator=torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_array_equal(x, y)
    assert np.all((np.abs(x) >= 0.5) & (np.abs(x) <= 1.5))
    assert abs((x > 0).mean() - 0.5) < 5 * 0.5 / np.sqrt(n)
    # E a and E a^2 within 5 Monte-Carlo standard errors of the constants used by random_a_moments
    assert abs(x.mean() - st.A_MEAN) < 5 * x.std() / np.sqrt(n)
    assert abs((x**2).mean() - st.A_SECOND_MOMENT) < 5 * (x**2).std() / np.sqrt(n)
    # each half is 1 + U(-1,1)/2 (resp. -1 + ...): uniform on [0.5, 1.5], variance 1/12
    pos = x[x > 0]
    assert abs(pos.mean() - 1.0) < 5 * np.sqrt(1 / 12 / pos.size)
    assert abs(pos.var() - 1 / 12) < 5 * np.sqrt((1 / 80 - 1 / 144) / pos.size)  # Var((U/2)^2) for U/2 ~ U(-1/2,1/2)


@pytest.mark.parametrize("z", [-0.7, 0.3, 0.1 + 0.4j])
def test_random_a_moments_degenerate_distribution_is_deterministic(z):
    for a in [1.0, -1.0, 0.6]:
        mean, var = st.random_a_moments(z, 30, p0=0.8, a_mean=a, a_second_moment=a * a)
        p_prev = p_cur = 0.8 + 0j
        ref = [p_cur]
        for _ in range(30):
            p_prev, p_cur = p_cur, a * p_prev + (1 - a + z) * p_cur
            ref.append(p_cur)
        np.testing.assert_allclose(mean, np.array(ref), rtol=1e-12, atol=1e-12)
        assert np.abs(var).max() < 1e-9 * np.max(np.abs(ref)) ** 2


@pytest.mark.parametrize("z", [0.25, -0.2 + 0.6j])
def test_random_a_moments_exact_for_two_point_distribution(z):
    # a_j in {0.5, -1.2} with probabilities {0.3, 0.7}: E a != 0, so every term of the recurrence matters.
    # Enumerate all 2**n paths and take the exact probability-weighted mean and variance.
    vals, probs, n = np.array([0.5, -1.2]), np.array([0.3, 0.7]), 10
    idx = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    a, w = vals[idx], probs[idx].prod(1)
    p_prev = p_cur = np.full(2**n, 1.0 - 0.5j)
    paths = [p_cur]
    for j in range(n):
        p_prev, p_cur = p_cur, a[:, j] * p_prev + (1 - a[:, j] + z) * p_cur
        paths.append(p_cur)
    paths = np.stack(paths, 1)
    mean_ref = w @ paths
    var_ref = w @ np.abs(paths - mean_ref) ** 2
    mean, var = st.random_a_moments(z, n, p0=1.0 - 0.5j, a_mean=probs @ vals, a_second_moment=probs @ vals**2)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var, var_ref, rtol=1e-10, atol=1e-12)


def test_random_a_moments_closed_forms():
    mean, var = st.random_a_moments(-0.3, 25)
    assert np.isrealobj(mean)
    np.testing.assert_allclose(mean, 0.7 ** np.arange(26), rtol=1e-12)  # E a = 0: forward Euler
    _, var0 = st.random_a_moments(0.0, 25)
    assert np.abs(var0).max() < 1e-12  # p = const solves the recurrence for every a
    assert var[0] == 0 and abs(var[1]) < 1e-12 and var[2] > 0.05  # p[1] = (1+z) p0 is deterministic


@pytest.mark.parametrize("z", [-0.3, 0.2, -0.1 + 0.5j])
def test_random_a_moments_match_monte_carlo(z):
    n_samples, n_steps = 200_000, 15
    mean, var = st.random_a_moments(z, n_steps, p0=1.0)
    paths = st.simulate_random_a(z, n_steps, n_samples, seed=7)
    assert paths.shape == (n_samples, n_steps + 1)
    mc_mean = paths.mean(0)
    dev2 = np.abs(paths - mc_mean) ** 2
    mc_var = dev2.mean(0)
    # standard errors: of the mean sqrt(Var/n); of the variance std(|p - mean|^2)/sqrt(n). Allow 5 of them.
    se_mean = np.sqrt(mc_var / n_samples)
    se_var = dev2.std(0) / np.sqrt(n_samples)
    # plus float rounding: p[1] = a + (1 - a + z) is 1 + z only up to ~1e-16 per sample
    rounding = 1e-9 * np.maximum(1.0, np.abs(mean))
    assert np.all(np.abs(mc_mean - mean) <= 5 * se_mean + rounding)
    assert np.all(np.abs(mc_var - var) <= 5 * se_var + rounding)
    assert var[-1] > 20 * se_var[-1]  # the variance is resolved, so the check has teeth


def linear_block(W):
    lin = torch.nn.Linear(W.shape[0], W.shape[0], bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


def matrix_with_eigenvalues(ev_real, ev_complex, seed):
    """Real matrix with given real eigenvalues and complex-conjugate pairs (x + iy, x - iy)."""
    blocks = [np.array([[e]]) for e in ev_real] + [np.array([[c.real, c.imag], [-c.imag, c.real]]) for c in ev_complex]
    n = sum(b.shape[0] for b in blocks)
    D = np.zeros((n, n))
    i = 0
    for b in blocks:
        D[i:i + b.shape[0], i:i + b.shape[0]] = b
        i += b.shape[0]
    S = np.random.default_rng(seed).normal(size=(n, n)) + 3 * np.eye(n)
    return torch.tensor(S @ D @ np.linalg.inv(S))


def test_jacobian_probe_linear_block_known_eigenvalues():
    W = matrix_with_eigenvalues([3.0, -1.5, 1.0, 0.2], [0.5 + 2j], seed=0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = st.jacobian_top_eigenvalues(linear_block(W), x, k=4, iters=12)
    expected = np.array([3.0, 0.5 + 2j, 0.5 - 2j, -1.5])
    assert got.dtype == np.complex128 and got.shape == (4,)
    np.testing.assert_allclose(got, expected, atol=1e-8)


def test_jacobian_probe_nonlinear_block_matches_dense_jacobian():
    torch.manual_seed(0)
    d = 8
    lin = torch.nn.Linear(d, d).double()
    block = torch.nn.Sequential(lin, torch.nn.Tanh())
    x = 2.0 * torch.randn(1, 1, d, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: block(v).reshape(-1), x.reshape(-1)).numpy()
    ref = np.linalg.eigvals(J)
    # the Jacobian depends on x (tanh' != 1 here), so a probe at the wrong point would differ
    assert np.abs(np.sort(np.abs(ref)) - np.sort(np.abs(np.linalg.eigvals(lin.weight.detach().numpy())))).max() > 0.1
    got = st.jacobian_top_eigenvalues(block, x, k=d, iters=d)
    for e in ref:
        assert np.abs(got - e).min() < 1e-8
    assert np.all(np.diff(np.abs(got)) <= 1e-12)


def test_jacobian_probe_dominant_eigenvalue_with_short_krylov():
    rng = np.random.default_rng(2)
    rest = rng.uniform(-1, 1, 37)
    W = matrix_with_eigenvalues([5.0, *rest], [0.3 + 0.6j], seed=1)
    x = torch.randn(2, 2, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # J = I_4 (x) W (the block acts on each of the 4 rows): eigenvalue 5 has multiplicity 4. The Krylov
    # space of one start vector holds one copy; rounding (u = 2^-53) seeds the other copies, which then
    # grow by |5| / rho_2 per step and surface as a ghost Ritz value (measured: 4.946 at 19 steps, 5.0004
    # at 20) after about ln(1/u) / ln(5 / rho_2) ~ 21 steps. Stop well before that: 15 steps of 160 unknowns.
    rho_2 = np.sort(np.abs(np.linalg.eigvals(W.numpy())))[-2]
    u = np.finfo(np.float64).eps / 2
    iters = 15
    assert iters < np.log(1 / u) / np.log(5.0 / rho_2) - 3
    got = st.jacobian_top_eigenvalues(linear_block(W), x, k=1, iters=iters)
    # Arnoldi's bound for the dominant Ritz value after m steps: |theta - lambda_1| <= kappa(V) |lambda_1|
    # (rho_2 / |lambda_1|)^m, kappa(V) the eigenvector matrix's condition number (91 here; bound 5e-9,
    # measured 1.2e-14).
    kappa = np.linalg.cond(np.linalg.eig(W.numpy())[1])
    assert abs(got[0] - 5.0) <= kappa * 5.0 * (rho_2 / 5.0) ** iters


def test_jacobian_probe_rejects_bad_k():
    with pytest.raises(ValueError, match="k"):
        st.jacobian_top_eigenvalues(torch.nn.Identity(), torch.zeros(1, 1, 3), k=4, iters=10)


def test_stability_table_rows_consistent():
    rows = st.stability_table()
    keys = {"scheme", "a", "b", "h_lam_re", "h_lam_im", "rho_forward", "rho_backward",
            "forward_stable", "forward_backward_stable"}
    assert rows and all(set(r) == keys for r in rows)
    assert {r["scheme"] for r in rows} == {"midpoint", "leapfrog", "midpoint_a", "hamiltonian"}
    for r in rows:
        if r["forward_backward_stable"]:
            assert abs(r["rho_forward"] - 1) < 1e-9 and abs(r["rho_backward"] - 1) < 1e-9
            assert r["forward_stable"]
        if r["forward_stable"]:
            assert r["rho_forward"] <= 1 + 1e-9
    assert any(r["forward_backward_stable"] for r in rows)
    assert any(r["forward_stable"] and not r["forward_backward_stable"] for r in rows)


def test_plot_writes_png(tmp_path):
    path = tmp_path / "stability.png"
    assert st.plot_stability_regions(path) == path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_jacobian_probe_transformer_block_matches_dense_jacobian(device):
    # SDPA's fused kernels (CPU flash, CUDA flash/efficient) have no forward-mode derivative; the probe
    # must run attention on the math backend, and only for its own duration.
    import revkernels as rk
    torch.manual_seed(0)
    block = rk.TransformerBlock(16, 2).double().to(device).eval()
    x = torch.randn(1, 3, 16, dtype=torch.float64, device=device)
    flags = [f() for f in (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.mem_efficient_sdp_enabled,
                           torch.backends.cuda.math_sdp_enabled)]
    got = st.jacobian_top_eigenvalues(block, x, k=4, iters=x.numel())      # full Krylov space: exact
    assert flags == [f() for f in (torch.backends.cuda.flash_sdp_enabled,
                                   torch.backends.cuda.mem_efficient_sdp_enabled,
                                   torch.backends.cuda.math_sdp_enabled)]
    J = torch.autograd.functional.jacobian(lambda v: block(v.view_as(x)).reshape(-1), x.reshape(-1))
    ref = np.linalg.eigvals(J.cpu().numpy())
    np.testing.assert_allclose(np.abs(got), np.sort(np.abs(ref))[::-1][:4], rtol=1e-8)
    for e in got:                       # conjugate pairs tie in modulus: match against the whole spectrum
        assert np.abs(ref - e).min() < 1e-8 * max(1.0, abs(e))
