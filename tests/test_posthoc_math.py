"Post-hoc EMA math (`fastxtend_ema.posthoc`): widths, betas, profile inner products against quadrature and discrete EMAs, reconstruction"
import functools
import math
import numpy as np
import pytest
from numpy.polynomial.legendre import leggauss

import fastxtend_ema.posthoc as pc

G05, G10 = pc.sigma_rel_to_gamma(0.05), pc.sigma_rel_to_gamma(0.10)

# ---------------------------------------------------------------------------------------------------- helpers
def tracked_ema(traj, gamma, dt=1, snap_every=None, wrong_beta=False):
    "Float64 EMA of `traj` (shape (T, D), row s-1 = weights after step s) updated every `dt` steps with `power_beta`"
    T = traj.shape[0]
    ema, snaps = np.zeros(traj.shape[1]), {}
    for t in range(dt, T+1, dt):
        beta = pc.power_beta(t, 1 if wrong_beta else dt, gamma)
        ema = beta*ema + (1-beta)*traj[t-1]
        if snap_every and t % snap_every == 0: snaps[t] = ema.copy()
    return ema, snaps

def direct_ema(traj, t, gamma):
    "The dt=1 power-function EMA at step `t`, from the closed-form per-step weights (no recursion)"
    s = np.arange(1, t+1, dtype=np.float64)
    w = (s/t)**(gamma+1) - ((s-1)/t)**(gamma+1)  # plain formula, independent of pc.power_ema_weights' log form
    return w @ traj[:t]

def walk(T, D, seed=0, drift=0.02, noise=0.1):
    "A noisy random walk with a per-dimension drift, shape (T, D)"
    rng = np.random.default_rng(seed)
    return np.cumsum(drift*rng.standard_normal(D) + noise*rng.standard_normal((T, D)), axis=0)

def rel(a, b): return np.linalg.norm(a-b)/np.linalg.norm(b)

def _gl_panels(lo, hi, n=20):
    "Gauss-Legendre nodes and weights for each panel [lo_k, hi_k]"
    x, w = leggauss(n)
    lo, hi = np.asarray(lo)[..., None], np.asarray(hi)[..., None]
    return (hi-lo)/2*x + (hi+lo)/2, (hi-lo)/2*w

def quad_dot(t_a, g_a, t_b, g_b, levels_low=200, levels_high=60):
    "<p_a, p_b> by composite Gauss-Legendre on [0, min(t_a, t_b)], panels graded geometrically towards both ends"
    m = min(t_a, t_b)
    lows = m*0.5**np.arange(levels_low+1)  # m, m/2, ..., down towards 0 (integrand may be singular there)
    highs = m*(1 - 0.5**np.arange(1, levels_high+1))  # m/2, 3m/4, ... up towards m (integrand peaks there)
    edges = np.unique(np.concatenate([[0.], lows, highs, [m]]))
    tau, w = _gl_panels(edges[:-1], edges[1:])
    def p(t, g): return (g+1)/t*np.exp(g*np.log(tau/t))  # profile; logs so huge t and gamma do not overflow
    return float(np.sum(w*p(t_a, g_a)*p(t_b, g_b)))

# ------------------------------------------------------------------------------------------- sigma_rel, gamma
def test_edm2_gammas():
    assert G05 == pytest.approx(16.97, abs=5e-3) and G10 == pytest.approx(6.94, abs=5e-3)
    assert pc.gamma_to_sigma_rel(G05) == pytest.approx(0.05, rel=1e-13)
    assert pc.gamma_to_sigma_rel(G10) == pytest.approx(0.10, rel=1e-13)

def test_sigma_rel_round_trip():
    s = np.array([1e-4, 1e-3, 0.01, 0.02, 0.05, 0.07, 0.1, 0.13, 0.2, 0.25, 0.28, 0.3, pc.SIGMA_REL_MAX])
    np.testing.assert_allclose(pc.gamma_to_sigma_rel(pc.sigma_rel_to_gamma(s)), s, rtol=1e-12)
    g = np.array([pc.GAMMA_SIGMA_MAX+0.05, -0.2, 0., 1., 3.5, 6.94, 16.97, 100., 1e4])
    np.testing.assert_allclose(pc.sigma_rel_to_gamma(pc.gamma_to_sigma_rel(g)), g, rtol=1e-9, atol=1e-12)

@pytest.mark.parametrize('s', [0.005, 0.05, 0.1, 0.2, 0.29, 0.3])
def test_gamma_is_largest_root_of_cubic(s):
    roots = np.roots([1, 7, 16 - s**-2, 12 - s**-2])
    largest = roots[np.abs(roots.imag) < 1e-9].real.max()
    assert pc.sigma_rel_to_gamma(s) == pytest.approx(largest, rel=1e-9)
    assert pc.sigma_rel_to_gamma(s) > -1

def test_scalar_and_array_outputs():
    assert isinstance(pc.sigma_rel_to_gamma(0.1), float) and isinstance(pc.gamma_to_sigma_rel(3.), float)
    assert pc.sigma_rel_to_gamma([0.05, 0.1]).shape == (2,)

@pytest.mark.parametrize('s', [0., -0.1, 0.31, 1., float('nan')])
def test_bad_sigma_rel(s):
    with pytest.raises(ValueError, match='sigma_rel'): pc.sigma_rel_to_gamma(s)

def test_bad_gamma_for_width():
    with pytest.raises(ValueError, match='gamma'): pc.gamma_to_sigma_rel(-1.)

# ------------------------------------------------------------------------------------------------ power_beta
def test_power_beta_values():
    assert pc.power_beta(1, 1, 6.94) == 0. and pc.power_beta(50, 50, 16.97) == 0.  # first update copies
    assert pc.power_beta(100, 1, 6.94) == pytest.approx(0.99**7.94, rel=1e-14)
    assert pc.power_beta(1000, 10, 0.) == pytest.approx(0.99, rel=1e-14)
    assert pc.power_beta(1e12, 1, 16.97) == pytest.approx(1 - 17.97e-12, rel=1e-15)  # log1p keeps the small 1-beta

@pytest.mark.parametrize('args,name', [((0, 1, 1.), 't'), ((-3, 1, 1.), 't'), ((5, 0, 1.), 'dt'),
                                       ((5, 6, 1.), 'dt'), ((5, 1, -1.), 'gamma'), ((5, 1, float('nan')), 'gamma')])
def test_power_beta_bad(args, name):
    with pytest.raises(ValueError, match=name): pc.power_beta(*args)

@pytest.mark.parametrize('dt', [1, 5])
def test_power_ema_weights_match_recursion(dt):
    "Run the update on one-hot weights: the EMA's coefficient on each update is `power_ema_weights`"
    T, g = 400, 6.94
    w = np.zeros(T//dt)
    for j, t in enumerate(range(dt, T+1, dt)):
        beta = pc.power_beta(t, dt, g)
        w *= beta; w[j] += 1-beta
    np.testing.assert_allclose(w, pc.power_ema_weights(T, g, dt), rtol=1e-11, atol=1e-300)
    assert w.sum() == pytest.approx(1, abs=1e-12)

def test_power_ema_weights_are_bin_integrals_of_profile():
    "Exactly: the dt=1 EMA's weight on step s is the profile's mass on [s-1, s], at every t"
    for T, g in [(1, 3.), (7, 16.97), (300, 6.94), (300, 0.5)]:
        s = np.arange(1, T+1)
        mass = (s/T)**(g+1) - ((s-1)/T)**(g+1)  # integral of (g+1) tau**g / T**(g+1) over [s-1, s]
        np.testing.assert_allclose(pc.power_ema_weights(T, g), mass, rtol=1e-12, atol=1e-300)

def test_power_ema_weights_bad():
    with pytest.raises(ValueError, match='multiple of dt'): pc.power_ema_weights(10, 1., 3)

# ----------------------------------------------------------------------------------------------- profile_dot
T_GRID = [1., 37., 1e4, 1e9]
G_GRID = [-0.3, 0., 1.5, 6.94, 16.97, 100., 1000.]

@pytest.mark.parametrize('g_a', G_GRID)
def test_profile_dot_vs_quadrature(g_a):
    for t_a in T_GRID:
        for t_b in T_GRID:
            for g_b in G_GRID:
                want = quad_dot(t_a, g_a, t_b, g_b)
                got = pc.profile_dot(t_a, g_a, t_b, g_b)
                if want < 1e-290: assert got < 1e-280; continue  # both underflow (t ratio**gamma is tiny)
                assert got == pytest.approx(want, rel=1e-10), (t_a, g_a, t_b, g_b)

def test_profile_dot_huge_values_stay_finite():
    got = pc.profile_dot(1e15, 500., 2e15, 500.)  # t**gamma alone would overflow float64
    assert got == pytest.approx(501**2/1001/2e15 * 0.5**500, rel=1e-12)
    assert pc.profile_dot(1e15, 5000., 2e15, 5000.) == 0.  # 0.5**5000 underflows: a clean 0, no nan or inf
    assert pc.profile_dot(3e14, 1e4, 3e14, 1e4) == pytest.approx((1e4+1)**2/(2e4+1)/3e14, rel=1e-13)

def test_profile_dot_symmetric_and_broadcasting():
    ta, ga = np.array([[10.], [500.], [1e6]]), np.array([[0.], [6.94], [16.97]])
    tb, gb = np.array([3., 500., 2e6, 7e5]), np.array([6.94, 6.94, 100., 2.])
    d = pc.profile_dot(ta, ga, tb, gb)
    assert d.shape == (3, 4)
    np.testing.assert_allclose(d, pc.profile_dot(tb, gb, ta, ga), rtol=1e-15)
    assert isinstance(pc.profile_dot(1., 1., 2., 2.), float)

@pytest.mark.parametrize('args,name', [((0., 1., 1., 1.), 't_a'), ((1., 1., -2., 1.), 't_b'),
                                       ((1., -1., 1., 1.), 'gamma_a'), ((1., 1., 1., -1.5), 'gamma_b'),
                                       ((1., -0.6, 1., -0.6), 'gamma_a \\+ gamma_b')])
def test_profile_dot_bad(args, name):
    with pytest.raises(ValueError, match=name): pc.profile_dot(*args)

@pytest.mark.parametrize('dt', [1, 8])
def test_profile_dot_vs_discrete_ema_weights(dt):
    "The tracked EMA's per-update weights, divided by dt, converge to the profile; their dot products to profile_dot"
    g_b, T = G10, 16000
    for g_a in [0., G10, G05]:
        for t_a in [T//2, 3*T//4, T]:
            wa, wb = pc.power_ema_weights(t_a, g_a, dt), pc.power_ema_weights(T, g_b, dt)[:t_a//dt]
            assert (wa @ wb)/dt == pytest.approx(pc.profile_dot(t_a, g_a, T, g_b), rel=2e-4 if dt > 1 else 1e-6)
    errs = []  # sup error of the per-step weights against the profile at the midpoint of each update's interval
    for T in [200, 2000, 20000]:
        w, s = pc.power_ema_weights(T, G05, dt)/dt, np.arange(dt, T+1, dt) - dt/2
        p = (G05+1)/T*(s/T)**G05
        errs.append(np.abs(w-p).max()/p.max())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5 * dt**2

def test_discrete_and_continuous_differ_at_small_t():
    "For a few steps the discrete EMA is far from its continuous model (documented, not a bug)"
    w = pc.power_ema_weights(5, G05)
    assert w @ w / pc.profile_dot(5, G05, 5, G05) < 0.8

# ---------------------------------------------------------------------------------------------- reconstruction
def _snapshot_grid(n, T):
    t = np.arange(1, n+1)*(T//n)
    return np.repeat(t, 2).astype(float), np.tile([G05, G10], n)

def test_reconstruction_exact_at_a_snapshot():
    st, sg = _snapshot_grid(8, 8000)
    traj = walk(8000, 4)
    snaps = {g: tracked_ema(traj, g, snap_every=1000)[1] for g in (G05, G10)}
    stack = np.stack([snaps[g][int(t)] for t, g in zip(st, sg)])
    for j in [len(st)-1, len(st)-2, 5, 0]:
        x = pc.solve_coefficients(st, sg, st[j], sg[j])
        np.testing.assert_allclose(x, np.eye(len(st))[j], atol=1e-6)
        assert rel(pc.reconstruct(stack, x), stack[j]) < 1e-6

def test_coefficients_sum_to_one_and_shapes():
    st, sg = _snapshot_grid(16, 16000)
    x = pc.solve_coefficients(st, sg, 16000., pc.sigma_rel_to_gamma(0.07))
    assert x.shape == (32,) and x.dtype == np.float64 and x.sum() == pytest.approx(1, abs=1e-12)
    tg = pc.sigma_rel_to_gamma(np.array([0.02, 0.07, 0.2]))
    X = pc.solve_coefficients(st, sg, [16000., 12000., 9000.], tg)
    assert X.shape == (32, 3)
    np.testing.assert_allclose(X.sum(0), 1, atol=1e-12)
    np.testing.assert_allclose(X[:, 1], pc.solve_coefficients(st, sg, 12000., tg[1]), rtol=1e-9, atol=1e-12)
    assert pc.solve_coefficients([5.], [3.], 5., 3.).tolist() == [1.]

@functools.lru_cache
def _tracked_run(T=6000, every=250):
    "A 6-dim random walk and the snapshots of its two tracked EMAs every `every` steps (shared by tests)"
    traj = walk(T, 6, seed=1)
    return traj, {g: tracked_ema(traj, g, snap_every=every)[1] for g in (G05, G10)}

@pytest.mark.parametrize('sigma_rel,t_frac,tol', [(0.04, 1, 1e-4), (0.06, 1, 1e-4), (0.075, 1, 1e-4), (0.09, 1, 1e-4),
                                                  (0.12, 1, 1e-4), (0.15, 1, 3e-4), (0.07, 0.75, 1e-4)])
def test_reconstruction_matches_direct_ema(sigma_rel, t_frac, tol):
    "Snapshots of the two tracked EMAs every 250 steps rebuild the direct float64 EMA of another width"
    T, traj, snaps = 6000, *_tracked_run()
    st = np.array([t for g in (G05, G10) for t in snaps[g]], dtype=float)
    sg = np.array([g for g in (G05, G10) for t in snaps[g]])
    stack = np.stack([snaps[g][int(t)] for t, g in zip(st, sg)])
    t, g = int(T*t_frac), pc.sigma_rel_to_gamma(sigma_rel)
    want = direct_ema(traj, t, g)
    err = rel(pc.reconstruct(stack, pc.solve_coefficients(st, sg, t, g)), want)
    nearest = min(rel(snaps[gg][t], want) for gg in (G05, G10))
    assert err < tol and err < nearest/100, (err, nearest)  # measured: err ~1e-5, nearest ~1e-2

def test_updating_every_k_steps_needs_dt_in_beta():
    "Updating every k steps: beta with dt=k tracks the direct EMA, beta with dt=1 (steps ignored) does not"
    T, k, D = 6000, 10, 6
    traj = walk(T, D, seed=2)
    for g in (G05, G10):
        want = direct_ema(traj, T, g)
        right = tracked_ema(traj, g, dt=k)[0]
        wrong = tracked_ema(traj, g, dt=k, wrong_beta=True)[0]
        # exact: the dt=k EMA is the dt=k weights applied to the subsampled trajectory
        np.testing.assert_allclose(right, pc.power_ema_weights(T, g, k) @ traj[k-1::k], rtol=1e-11)
        err_right, err_wrong = rel(right, want), rel(wrong, want)  # measured ~8e-4 (subsampling) vs ~0.3-0.5
        assert err_right < 3e-3 and err_wrong > 100*err_right, (err_right, err_wrong)
        # exact again: on a trajectory constant over each block of k steps the dt=k EMA equals the per-step EMA
        blocky = np.repeat(traj[k-1::k], k, axis=0)
        np.testing.assert_allclose(tracked_ema(blocky, g, dt=k)[0], direct_ema(blocky, T, g), rtol=1e-11)
        assert rel(tracked_ema(blocky, g, dt=k, wrong_beta=True)[0], direct_ema(blocky, T, g)) > 1e-2

# ------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize('kw,name', [
    (dict(snap_t=[], snap_gamma=[]), 'snap_t'),
    (dict(snap_t=[[1., 2.]], snap_gamma=[[1., 2.]]), 'snap_t'),
    (dict(snap_t=[1., 2.], snap_gamma=[1.]), 'snap_gamma'),
    (dict(snap_t=[0., 2.]), 'snap_t'),
    (dict(snap_gamma=[1., -0.7]), 'snap_gamma'),
    (dict(target_t=2.5), 'target_t'),
    (dict(target_t=0.), 'target_t'),
    (dict(target_gamma=-0.5), 'target_gamma'),
    (dict(target_gamma=float('inf')), 'target_gamma'),
])
def test_solve_coefficients_bad(kw, name):
    args = dict(snap_t=[1., 2.], snap_gamma=[1., 1.], target_t=2., target_gamma=3.) | kw
    with pytest.raises(ValueError, match=name): pc.solve_coefficients(**args)

def test_profile_error():
    "Against quadrature: ||x1 p1 + x2 p2 - p_t||**2 expanded into inner products computed numerically"
    st, sg, x, tt, tg = [700., 1000.], [16.97, 6.94], np.array([0.3, 0.7]), 900., 10.
    P = [(st[0], sg[0]), (st[1], sg[1])]
    sq = sum(x[i]*x[j]*quad_dot(*P[i], *P[j]) for i in range(2) for j in range(2))
    sq += quad_dot(tt, tg, tt, tg) - 2*sum(x[i]*quad_dot(*P[i], tt, tg) for i in range(2))
    assert pc.profile_error(st, sg, x, tt, tg) == pytest.approx(math.sqrt(sq/quad_dot(tt, tg, tt, tg)), rel=1e-8)
    assert pc.profile_error(st, sg, [0., 1.], 1000., 6.94) < 1e-7
    stt, sgg = _snapshot_grid(16, 16000)  # a target between snapshot times is much harder than one at a snapshot time
    g = pc.sigma_rel_to_gamma(0.07)
    at = pc.profile_error(stt, sgg, pc.solve_coefficients(stt, sgg, 8000., g), 8000., g)
    between = pc.profile_error(stt, sgg, pc.solve_coefficients(stt, sgg, 8500., g), 8500., g)
    assert at < 0.02 and between > 10*at

def test_reconstruct_bad():
    with pytest.raises(ValueError, match='coeffs'): pc.reconstruct(np.zeros((3, 4)), np.ones(2)/2)
    with pytest.raises(TypeError, match='t'): pc.power_beta('a', 1, 1.)
