"""Linear stability of the reversible schemes (Gal et al., section 3) and an empirical Jacobian probe.

Three-term family, linear test equation f(p) = lam * p, written with the full coefficient of f
folded into ``h_lam`` (``z``)::

    p[j+1] = a * p[j-1] + b * p[j] + z * p[j]      (eq. 3.6 has b = 1 - a)
    r**2 - (b + z) * r - a = 0                      (eq. 3.2)

In the package's schemes the coefficient of f is c (DESIGN section 1), so z = c * lam:
midpoint z = 2h*lam (a=1, b=0), leapfrog z = h**2*lam (a=-1, b=2), midpoint(a) z = h*lam.

"Forward-backward stable" means every solution of the recurrence *and* of its exact inverse
p[j-1] = (p[j+1] - (b + z) p[j]) / a stays bounded. The inverse has roots 1/r, so both roots
must lie on the unit circle and be distinct: repeated roots on the circle give solutions growing
linearly in j, which this module counts as UNSTABLE (strict inequalities below). This needs
|a| = |r1 r2| = 1; with w = b + z:

    a = +1:  Re(w) = 0 and |Im(w)| < 2   (r2 = -conj(r1); midpoint: |h*lam| < 1, lam imaginary)
    a = -1:  Im(w) = 0 and |Re(w)| < 2   (r2 = conj(r1);  leapfrog: -4 < h**2*lam < 0, lam real)
    other a: never (|a| < 1: the inverse blows up; |a| > 1: the forward recurrence blows up).

Hamiltonian scheme on the linear test system (eqs. 3.15-3.16)::

    q[l] = a q[l-1] + alpha p[l-1],  p[l] = b p[l-1] + beta q[l]
    (q, p)[l] = M (q, p)[l-1],   M = [[a, alpha], [a*beta, b + alpha*beta]],
    det M = a b,   t = tr M = a + b + alpha beta.

Eigenvalues solve mu**2 - t mu + ab = 0. Forward-backward stable iff both lie on the
unit circle and are distinct, or M is a scalar multiple of I (alpha = beta = 0, a = b = +-1):

    ab = +1:  Im(t) = 0 and |Re(t)| < 2   (or alpha = beta = 0, where t = +-2 and M = +-I)
    ab = -1:  Re(t) = 0 and |Im(t)| < 2   (for real coefficients: t = 0 exactly)

Deviation from the paper: eq. 3.16 states |ab| = 1 and |a + b + alpha beta| <= 2. That is
sufficient only for ab = +1 (and then the boundary |t| = 2 is a repeated, non-diagonalisable
eigenvalue with linear growth unless M = +-I); for ab = -1 the eigenvalues (t +- sqrt(t^2+4))/2
are real with product -1, so any real t != 0 has one eigenvalue outside the unit circle.
"""
import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "A_MEAN",
    "A_SECOND_MOMENT",
    "characteristic_roots",
    "is_forward_stable",
    "is_forward_backward_stable",
    "hamiltonian_matrix",
    "hamiltonian_eigenvalues",
    "hamiltonian_is_stable",
    "sample_midpoint_a",
    "random_a_moments",
    "simulate_random_a",
    "jacobian_top_eigenvalues",
    "stability_table",
    "plot_stability_regions",
]

# Moments of a_j from eq. 3.7: a = s + U/2, s = +-1 with prob 1/2, U ~ U(-1, 1) independent of s.
# E[a] = E[s] + E[U]/2 = 0;  E[a^2] = E[s^2] + E[s]E[U] + E[U^2]/4 = 1 + (1/3)/4 = 13/12.
A_MEAN = 0.0
A_SECOND_MOMENT = 13.0 / 12.0


def _as_complex(*xs):
    return np.broadcast_arrays(*(np.asarray(x, dtype=np.complex128) for x in xs))


def characteristic_roots(a, b, h_lam):
    """Roots of r**2 - (b + h_lam) r - a = 0 (eq. 3.2), broadcast over the inputs.

    Returns a complex array of shape ``broadcast(a, b, h_lam).shape + (2,)``; ``[..., 0]`` is the
    root of larger modulus (computed without cancellation), ``[..., 1] = -a / [..., 0]``.
    """
    a, b, z = _as_complex(a, b, h_lam)
    w = b + z
    s = np.sqrt(w * w + 4.0 * a)
    s = np.where((np.conj(w) * s).real < 0, -s, s)
    r1 = 0.5 * (w + s)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(r1 != 0, -a / np.where(r1 != 0, r1, 1.0), 0.0)
    return np.stack([r1, r2], axis=-1)


def is_forward_stable(a, b, h_lam, atol=1e-9):
    """Root condition for the forward three-term recurrence: |r| <= 1, and roots on |r| = 1 simple.

    Numerical (from :func:`characteristic_roots`, tolerance ``atol``); used for the forward-only
    regions of midpoint(a) with |a| != 1.
    """
    a, b, z = _as_complex(a, b, h_lam)
    r = characteristic_roots(a, b, z)
    rho = np.abs(r).max(axis=-1)
    w = b + z
    repeated_on_circle = (np.abs(w * w + 4.0 * a) <= atol) & (rho >= 1.0 - atol)
    return (rho <= 1.0 + atol) & ~repeated_on_circle


def is_forward_backward_stable(a, b, h_lam, atol=1e-12):
    """Forward and inverse three-term recurrence both bounded (eqs. 3.4-3.5), closed form.

    With w = b + h_lam: a = 1 needs Re w = 0 and |Im w| < 2; a = -1 needs Im w = 0 and |Re w| < 2;
    any other a is unstable. "= 0" and "a = +-1" are tested to ``atol``; the boundary |w| = 2
    (double root on the unit circle, linear growth) counts as unstable.
    """
    a, b, z = _as_complex(a, b, h_lam)
    w = b + z
    plus = (np.abs(a - 1.0) <= atol) & (np.abs(w.real) <= atol) & (np.abs(w.imag) < 2.0)
    minus = (np.abs(a + 1.0) <= atol) & (np.abs(w.imag) <= atol) & (np.abs(w.real) < 2.0)
    return plus | minus


def hamiltonian_matrix(a, b, alpha, beta):
    """Amplification matrix M = [[a, alpha], [a beta, b + alpha beta]] of the linear Hamiltonian step.

    (q, p)[l] = M (q, p)[l-1] for q[l] = a q[l-1] + alpha p[l-1], p[l] = b p[l-1] + beta q[l].
    Shape ``broadcast.shape + (2, 2)``, complex.
    """
    a, b, al, be = _as_complex(a, b, alpha, beta)
    return np.stack([np.stack([a, al], -1), np.stack([a * be, b + al * be], -1)], -2)


def hamiltonian_eigenvalues(a, b, alpha, beta):
    """Eigenvalues of :func:`hamiltonian_matrix`: mu**2 - (a + b + alpha beta) mu + ab = 0.

    Shape ``broadcast.shape + (2,)``, larger modulus first.
    """
    a, b, al, be = _as_complex(a, b, alpha, beta)
    # Same quadratic as eq. 3.2 with w = tr M and -a -> det M.
    return characteristic_roots(-a * b, a + b + al * be, 0.0)


def hamiltonian_is_stable(a, b, alpha, beta, atol=1e-12):
    """Forward-backward stability of the Hamiltonian step (eqs. 3.15-3.16, corrected; module docstring).

    With t = a + b + alpha beta: ab = 1 needs Im t = 0 and |Re t| < 2 (or alpha = beta = 0, M = +-I);
    ab = -1 needs Re t = 0 and |Im t| < 2; any other ab is unstable. Equalities to ``atol``.
    """
    a, b, al, be = _as_complex(a, b, alpha, beta)
    det, t = a * b, a + b + al * be
    scalar = (np.abs(al) <= atol) & (np.abs(be) <= atol) & (np.abs(a - b) <= atol)
    plus = (np.abs(det - 1.0) <= atol) & (np.abs(t.imag) <= atol) & ((np.abs(t.real) < 2.0) | scalar)
    minus = (np.abs(det + 1.0) <= atol) & (np.abs(t.real) <= atol) & (np.abs(t.imag) < 2.0)
    return plus | minus


def sample_midpoint_a(n, generator=None, dtype=torch.float64):
    """Draw n coefficients from eq. 3.7: with prob. 1/2 a = 1 + U(-1,1)/2, else a = -1 + U(-1,1)/2.

    ``generator``: a CPU ``torch.Generator`` (None: torch's global generator). Values lie in
    [-1.5, -0.5] U [0.5, 1.5], so a = 0 never occurs.
    """
    sign = torch.randint(0, 2, (n,), generator=generator).to(dtype) * 2 - 1
    u = torch.rand(n, generator=generator, dtype=dtype) * 2 - 1
    return sign + 0.5 * u


def random_a_moments(h_lam, n_steps, p0=1.0, a_mean=A_MEAN, a_second_moment=A_SECOND_MOMENT):
    """Exact mean and variance of p[j+1] = a_j p[j-1] + (1 - a_j + z) p[j], a_j i.i.d. (eqs. 3.8-3.10).

    Start p[-1] = p[0] = p0. a_j is independent of (p[j-1], p[j]), so with m = E a, s = E a^2,
    S_j = E|p_j|^2, C_j = E[p_j conj(p_{j-1})] and g = 1 + z:

        E p_{j+1} = m E p_{j-1} + (g - m) E p_j
        S_{j+1}   = s S_{j-1} + (|g|^2 - 2 m Re g + s) S_j + 2 Re[(m conj(g) - s) conj(C_j)]
        C_{j+1}   = m conj(C_j) + (g - m) S_j

    Variance is E|p_j - E p_j|^2 = S_j - |E p_j|^2 (rounding can leave ~-1e-16).
    Returns ``(mean, var)``, arrays of length n_steps + 1 for j = 0..n_steps (mean is real when
    h_lam and p0 are real). Defaults are eq. 3.7's E a = 0, E a^2 = 13/12, which reduce the mean
    to forward Euler: E p_{j+1} = (1 + z) E p_j.
    """
    z, p0c = complex(h_lam), complex(p0)
    g, m, s = 1.0 + z, float(a_mean), float(a_second_moment)
    mean = np.empty(n_steps + 1, dtype=np.complex128)
    second = np.empty(n_steps + 1)
    mean[0], second[0] = p0c, abs(p0c) ** 2
    m_prev, s_prev, c_cur = p0c, abs(p0c) ** 2, abs(p0c) ** 2
    for j in range(n_steps):
        mean[j + 1] = m * m_prev + (g - m) * mean[j]
        second[j + 1] = (s * s_prev + (abs(g) ** 2 - 2 * m * g.real + s) * second[j]
                         + 2 * ((m * np.conj(g) - s) * np.conj(c_cur)).real)
        c_cur = m * np.conj(c_cur) + (g - m) * second[j]
        m_prev, s_prev = mean[j], second[j]
    var = second - np.abs(mean) ** 2
    if np.isrealobj(h_lam) and np.isrealobj(p0):
        mean = mean.real
    return mean, var


def simulate_random_a(h_lam, n_steps, n_samples, seed=0, p0=1.0):
    """Monte-Carlo paths of p[j+1] = a_j p[j-1] + (1 - a_j + z) p[j], a_j from eq. 3.7.

    a_j come from :func:`sample_midpoint_a` with ``torch.Generator().manual_seed(seed)``.
    Returns an array of shape (n_samples, n_steps + 1) holding p[0..n_steps] (start p[-1] = p[0] = p0).
    """
    gen = torch.Generator().manual_seed(seed)
    a = sample_midpoint_a(n_samples * n_steps, generator=gen).numpy().reshape(n_samples, n_steps)
    complex_valued = not (np.isrealobj(h_lam) and np.isrealobj(p0))
    paths = np.empty((n_samples, n_steps + 1), dtype=np.complex128 if complex_valued else np.float64)
    paths[:, 0] = p0
    prev = paths[:, 0]
    for j in range(n_steps):
        paths[:, j + 1] = a[:, j] * prev + (1.0 - a[:, j] + h_lam) * paths[:, j]
        prev = paths[:, j]
    return paths


def jacobian_top_eigenvalues(block, x, k=4, iters=32, seed=0):
    """k dominant eigenvalues of the Jacobian of ``block`` at ``x`` by Arnoldi iteration.

    The Jacobian J = d block(x) / dx acts on R^{x.numel()}; J v comes from ``torch.func.jvp``.
    ``iters`` Arnoldi steps (capped at x.numel(); stops early on an invariant subspace) build an
    orthonormal Krylov basis Q and the Hessenberg H = Q^T J Q (twice-repeated Gram-Schmidt);
    the Ritz values eig(H) approximate J's extremal eigenvalues. Start vector: standard normal
    from ``torch.Generator().manual_seed(seed)``. Work happens in x's dtype (use float64 for
    accuracy); blocks with dropout must be in eval mode so every J v sees the same function.
    ``torch.nn.functional.scaled_dot_product_attention`` calls inside ``block`` (``rk.TransformerBlock``)
    run on SDPA's math backend during the probe, the one with a forward-mode derivative; attention
    through the ``flash_attn`` package (CUDA fp16/bf16 with it installed) has none: probe in fp32/fp64.
    Returns a complex128 numpy array of length k, sorted by decreasing modulus (ties: imag desc).
    """
    x = x.detach()
    n = x.numel()
    m = min(int(iters), n)
    if not 1 <= k <= m:
        raise ValueError(f"k must be in [1, min(iters, x.numel())] = [1, {m}], got k={k}")
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    eps = torch.finfo(x.dtype).eps

    def matvec(u):
        # Forward-mode AD has no rule for SDPA's fused kernels (CPU flash, CUDA flash/efficient):
        # attention inside `block` runs through the math backend for the probe only.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            out = torch.func.jvp(block, (x,), (u.view_as(x),))[1]
        if out.shape != x.shape:
            raise ValueError(f"block must map x.shape {tuple(x.shape)} to itself, got {tuple(out.shape)}")
        return out.reshape(-1)

    Q = torch.empty(m + 1, n, dtype=x.dtype, device=x.device)
    Q[0] = v.reshape(-1) / v.norm()
    H = np.zeros((m + 1, m))
    size = m
    for j in range(m):
        w = matvec(Q[j])
        w_norm = w.norm().item()
        for _ in range(2):
            c = Q[: j + 1] @ w
            w = w - Q[: j + 1].T @ c
            H[: j + 1, j] += c.double().cpu().numpy()
        H[j + 1, j] = w.norm().item()
        if H[j + 1, j] <= 100 * eps * max(w_norm, 1e-300):
            size = j + 1
            break
        Q[j + 1] = w / H[j + 1, j]
    ritz = np.linalg.eigvals(H[:size, :size]).astype(np.complex128)
    order = np.lexsort((-ritz.imag, -np.abs(ritz)))
    return ritz[order[:k]]


def _three_term_growth(a, b, z):
    r = np.abs(characteristic_roots(a, b, z))
    with np.errstate(divide="ignore"):
        return r.max(-1), 1.0 / r.min(-1)


def _hamiltonian_growth(a, b, alpha, beta):
    mu = np.abs(hamiltonian_eigenvalues(a, b, alpha, beta))
    with np.errstate(divide="ignore"):
        return mu.max(-1), 1.0 / mu.min(-1)


def stability_table():
    """Rows (dicts) of per-step growth and stability for representative points of each scheme.

    Columns: scheme, a, b, h_lam_re, h_lam_im, rho_forward (max |root|), rho_backward
    (max |1/root|, the inverse recurrence), forward_stable, forward_backward_stable. For
    midpoint/leapfrog/midpoint_a h_lam is the full coefficient z = c*lam of the recurrence; for
    ``hamiltonian`` the columns a, b are the stream coefficients and h_lam is alpha*beta
    (alpha = 1, so M is never scalar and is similar to the companion matrix of its
    characteristic polynomial: the same root condition gives forward_stable).
    """
    three_term = [
        ("midpoint", 1.0, [0.5j, 1.9j, 2.0j, 2.5j, 0.1 + 1.0j, -0.5]),
        ("leapfrog", -1.0, [-1.0, -3.9, -4.0, 0.0, 0.5, -1.0 + 0.1j]),
        ("midpoint_a", 0.5, [-0.5, -2.0, 1.0j]),
        ("midpoint_a", -0.5, [-0.5, -2.5, 1.0j]),
        ("midpoint_a", 1.5, [-0.5, -4.0, 1.0j]),
    ]
    rows = []
    for scheme, a, zs in three_term:
        b = 1.0 - a
        for z in zs:
            fwd, bwd = _three_term_growth(a, b, z)
            rows.append(dict(scheme=scheme, a=a, b=b, h_lam_re=float(np.real(z)), h_lam_im=float(np.imag(z)),
                             rho_forward=float(fwd), rho_backward=float(bwd),
                             forward_stable=bool(is_forward_stable(a, b, z)),
                             forward_backward_stable=bool(is_forward_backward_stable(a, b, z))))
    for a, b, ab in [(1.0, 1.0, -1.0), (1.0, 1.0, -3.9), (1.0, 1.0, -4.0), (1.0, 1.0, 0.5),
                     (2.0, 0.5, -1.0), (1.0, -1.0, 0.0), (1.0, -1.0, 1.0), (1.0, 0.5, -1.0)]:
        fwd, bwd = _hamiltonian_growth(a, b, 1.0, ab)
        rows.append(dict(scheme="hamiltonian", a=a, b=b, h_lam_re=ab, h_lam_im=0.0,
                         rho_forward=float(fwd), rho_backward=float(bwd),
                         forward_stable=bool(is_forward_stable(-a * b, a + b + ab, 0.0)),
                         forward_backward_stable=bool(hamiltonian_is_stable(a, b, 1.0, ab))))
    return rows


def plot_stability_regions(path):
    """Stability regions in the complex z = h*lam plane (eq. 3.2) and the Hamiltonian alpha*beta plane.

    Colour: log10 of the per-step growth max(rho_forward, rho_backward) (0 = neither direction
    grows). Green fill: forward-stable region (root condition); blue fill: backward-stable region;
    red: the forward-backward stable set, which needs |a| = 1 (or |ab| = 1) and is a segment.
    Saves a PNG at ``path`` (Agg canvas, no pyplot state) and returns ``path``.
    """
    from matplotlib.figure import Figure

    x = np.linspace(-5.0, 3.0, 321)
    y = np.linspace(-3.0, 3.0, 241)
    Z = x[None, :] + 1j * y[:, None]
    extent = (x[0], x[-1], y[0], y[-1])
    panels = [
        ("midpoint  a=1, b=0", lambda: _three_term_growth(1.0, 0.0, Z), ([0, 0], [-2, 2])),
        ("leapfrog  a=-1, b=2", lambda: _three_term_growth(-1.0, 2.0, Z), ([-4, 0], [0, 0])),
        ("midpoint(a)  a=0.5", lambda: _three_term_growth(0.5, 0.5, Z), None),
        ("midpoint(a)  a=-0.5", lambda: _three_term_growth(-0.5, 1.5, Z), None),
        ("midpoint(a)  a=1.5", lambda: _three_term_growth(1.5, -0.5, Z), None),
        ("Hamiltonian  a=b=1, plane of alpha*beta", lambda: _hamiltonian_growth(1.0, 1.0, 1.0, Z),
         ([-4, 0], [0, 0])),
    ]
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 3)
    for ax, (title, growth, segment) in zip(axes.flat, panels):
        fwd, bwd = growth()
        im = ax.imshow(np.log10(np.maximum(fwd, bwd)), origin="lower", extent=extent, cmap="Greys",
                       vmin=0.0, vmax=1.0, aspect="auto")
        ax.contourf(x, y, fwd, levels=[0.0, 1.0 + 1e-9], colors=["tab:green"], alpha=0.45)
        ax.contourf(x, y, bwd, levels=[0.0, 1.0 + 1e-9], colors=["tab:blue"], alpha=0.45)
        if segment is not None:
            ax.plot(*segment, color="tab:red", lw=3, label="forward-backward stable (open segment)")
            ax.legend(loc="lower left", fontsize=8)
        else:
            ax.text(0.02, 0.03, "|a| != 1: never forward-backward stable", transform=ax.transAxes, fontsize=8,
                    bbox=dict(facecolor="white", alpha=0.8))
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(title)
        ax.set_xlabel("Re" + (" alpha*beta" if "Hamiltonian" in title else " h*lam"))
        ax.set_ylabel("Im")
    fig.colorbar(im, ax=axes, shrink=0.8, label="log10 max(rho_fwd, rho_bwd) per step")
    fig.suptitle("Linear stability (green: forward |r|<=1, blue: backward |1/r|<=1, red: both)")
    fig.savefig(path, dpi=90)
    return path
