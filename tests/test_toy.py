"""toy.py: every row of Table 1 on short runs, the theory curves against the
simulation, the exact-moment shortcut and the reduced-sample panels against
the plain per-sample loop, and the command line. CPU only."""
import contextlib
import io
import itertools
import json

import pytest
import torch

import isoloss
import toy

SIGMA, ALPHA = toy.DEFAULTS["sigma"], toy.DEFAULTS["alpha"]


def train(*settings, steps, samples=4_000, relu=False, seed=0, exact_moments=True, W0=None, lr=None):
    """Train the given Table 1 rows side by side from the paper's W0 (M=10, N=15).
    Returns {setting: (steps + 1, M) eigenvalues of W W^T, ascending}."""
    W0 = toy.initial_weights(toy.DEFAULTS, 10, 15) if W0 is None else W0
    runs = [toy.Run(s, W0, lr or toy.LR[s], relu=relu, exact_moments=exact_moments) for s in settings]
    toy.simulate(runs, steps, samples, seed, points=steps)
    return {r.setting: torch.tensor(r.out["eigenvalues"], dtype=torch.float64) for r in runs}


@pytest.fixture(scope="module")
def euclidean():
    """The four linear Euclidean rows, 1,500 steps (exact moment batches: fast)."""
    return train("euc", "euc_nosg", "euc_nopred", "iso_euc", steps=1_500)


@pytest.fixture(scope="module")
def cosine():
    """The two cosine rows with a stop-grad and a predictor, 600 steps on 4,000 fresh samples per step."""
    return train("cos", "iso_cos", steps=600)


# ---------------------------------------------------------------- Table 1, Euclidean rows

def test_euc_eigenvalues_approach_one(euclidean):
    s = euclidean["euc"]
    assert ((s[-1] - 1).abs() < (s[0] - 1).abs()).all()          # every mode moved towards 1
    assert ((s[-1, 1:] - 1).abs() < 0.01).all()                   # all but the smallest arrived ...
    assert s[-1, 0] < 0.1                                         # ... which lags: its rate ~ lambda^2


def test_euc_without_stop_grad_collapses(euclidean):
    s = euclidean["euc_nosg"]
    assert (s[1:] <= s[:-1] * (1 + 1e-9)).all()                   # every eigenvalue decreases, always
    assert (s[-1] < 0.6 * s[0]).all() and s[-1, :5].max() < 1e-8


def test_euc_without_predictor_does_not_move():
    s = train("euc_nopred", steps=5_000)["euc_nopred"]              # lr 0.1, 50,000-sample moments
    assert ((s - s[0]).abs() / s[0]).max() < 0.03


def test_iso_euc_brings_small_eigenvalues_up_faster(euclidean):
    iso, euc = euclidean["iso_euc"], euclidean["euc"]
    assert ((iso[-1] - 1).abs() < 0.12).all()                     # all modes near 1 ...
    growth_iso, growth_euc = (iso[20] / iso[0]).log(), (euc[20] / euc[0]).log()
    assert growth_iso[0] > 10 * growth_euc[0]                     # ... the smallest far faster than under euc
    below = euc[0] < 0.6                                          # rates differ by 1/lambda (Eqs. 9, 16)
    assert (growth_iso[below] > 1.5 * growth_euc[below]).all()


@pytest.mark.parametrize("setting", ["euc", "euc_nosg", "euc_nopred", "iso_euc"])
def test_euclidean_theory_matches_the_simulation(euclidean, setting):
    s = euclidean[setting]
    steps = list(range(len(s)))
    th = toy.theory(setting, s[0].tolist(), steps, toy.LR[setting], SIGMA, ALPHA)
    assert toy.max_deviation(s.tolist(), th) < 0.03


def test_theory_recursion_tends_to_the_odes_closed_form():
    """For a small lr, the per-step theory approaches iso_euc's ODE ds/dt = 2 eta s (1 - s),
    whose solution is logistic: s(t) = 1 / (1 + (1/s0 - 1) exp(-2 eta t))."""
    s0, eta, steps = [0.01, 0.5, 3.0], 1e-4, [0, 1_000, 10_000, 30_000]
    th = torch.tensor(toy.theory("iso_euc", s0, steps, eta, SIGMA, 1.0), dtype=torch.float64)
    t = torch.tensor(steps, dtype=torch.float64)[:, None]
    exact = 1 / (1 + (1 / torch.tensor(s0, dtype=torch.float64) - 1) * torch.exp(-2 * eta * t))
    torch.testing.assert_close(th, exact.sort(-1).values, rtol=1e-3, atol=0)


# ---------------------------------------------------------------- Table 1, cosine rows

def spread(s):
    return s[..., -1] / s[..., 0]                                  # largest / smallest eigenvalue


def test_cos_eigenvalues_approach_a_common_value(cosine):
    s = cosine["cos"]
    assert spread(s[-1]) < spread(s[0]) / 4
    top = s[-1, 3:]                                                # all but the slowest modes agree
    assert top.max() / top.min() < 1.1


@pytest.mark.parametrize("seed", [2, 9, 12])
def test_cos_without_stop_grad_collapses_under_the_gradient_and_diverges_under_the_papers_rule(seed):
    """Table 1's row "all lambda diverge" holds for the paper's hand-written rule, not for the
    gradient of the loss. From W0 = randn(10, 15) / 4 after manual_seed(seed), lr 0.1, 900 steps on
    1,000 samples: the exact gradient drives all but two to four eigenvalues below 1e-6
    (dimensional collapse) and its total, trace W W^T, changes by under 5% from step 600 to 900;
    the paper's rule keeps every eigenvalue above 1e-3, its largest grows at every step and its
    trace by over 40% from step 600 to 900. Checked once for every seed 2-21: survivors 2 to 4,
    none above 10; exact trace within 2.2%; paper's smallest eigenvalue above 0.01, trace growth at
    least 47%. Seed 9 keeps four modes; at seed 12 the paper's fourth largest mode grows only 1.24x
    (the top three, 1.5x). (The full run: two survivors, at 3.9 and 4.0.)"""
    torch.manual_seed(seed)
    W0 = torch.randn(10, 15) / 4
    runs = [toy.Run("cos_nosg", W0, toy.LR["cos_nosg"], updates=u) for u in toy.UPDATES]
    toy.simulate(runs, 900, 1_000, seed, points=900)
    exact, paper = (torch.tensor(r.out["eigenvalues"], dtype=torch.float64) for r in runs)
    alive = (exact[-1] > 1e-6).sum()
    assert 2 <= alive <= 4 and (exact[0] > 1e-3).all() and exact[-1].max() < 10
    total, paper_total = exact.sum(1), paper.sum(1)                # trace W W^T
    assert (total[-1] / total[600] - 1).abs() < 0.05
    assert (paper[-1] > 1e-3).all() and (paper[1:, -1] > paper[:-1, -1]).all()
    assert paper_total[-1] > 1.4 * paper_total[600]


def test_cos_without_predictor_conserves_the_sum():
    s = train("cos_nopred", steps=3_000, samples=2_048)["cos_nopred"]
    total = s.sum(1)
    assert ((total - total[0]).abs() / total[0]).max() < 0.01     # sum conserved (App. C.4) ...
    assert (s[-1, 0] / s[0, 0]) > 1.1                              # ... while the modes move (slowly)


def test_iso_cos_equalises_faster_than_cos(cosine):
    iso, cos = cosine["iso_cos"], cosine["cos"]
    for t in (100, 300, 600):
        assert spread(iso[t]) < spread(cos[t]) / 2
    assert spread(iso[-1]) < 1.2


# ---------------------------------------------------------------- The paper's update rules (--updates paper)

def written_out(setting, mode, W, x1, x2, relu, W_P):
    """Delta W / eta of one step, one sample at a time in float64, as paper_update's docstring writes
    the rules (paper) or as the analytic gradient of the loss (exact; a zero z1, p or z2 contributes
    nothing, as in isoloss). Returns the batch mean, (M, N), before any nan_to_num."""
    W, x1, x2, W_P = W.double(), x1.double(), x2.double(), None if W_P is None else W_P.double()
    phi = (lambda a: a.clamp(min=0)) if relu else (lambda a: a)
    dphi = (lambda a: (a > 0).double()) if relu else (lambda a: torch.ones_like(a))
    eps = 1e-8
    total = torch.zeros_like(W)
    for a, b in zip(x1, x2):                                       # one sample: a = x1, b = x2, (N,)
        z1, z2, d1, d2 = phi(W @ a), phi(W @ b), dphi(W @ a), dphi(W @ b)
        p = z1 if W_P is None else W_P @ z1
        if mode == "paper":
            e = (p - z2) * d1
            np_, n2 = p.norm() + eps, z2.norm() + eps
            step = {
                "euc": lambda: -torch.outer(W_P.T @ e, a),
                "euc_nosg": lambda: -(-torch.outer(e, b) + torch.outer(W_P.T @ e, a)),
                "euc_nopred": lambda: -torch.outer(z1 - z2, a),
                "iso_euc": lambda: -torch.outer(e, a),
                "cos": lambda: torch.outer((W_P @ z2 / (np_ * n2) - (p @ z2) * (W_P @ p) / (np_ ** 3 * n2)) * d1, a),
                "iso_cos": lambda: torch.outer((z2 / (np_ * n2) - (p @ z2) * p / (np_ ** 3 * n2)) * d1, a),
                "cos_nosg": lambda: torch.outer((W_P @ (z1 + z2) / (np_ * n2)
                                                 - (p @ z2) * (W_P @ p + z2) / (np_ ** 3 * n2)) * d1, a),
                "cos_nopred": lambda: torch.outer((z2 / (z1.norm() * z2.norm())
                                                   - (z1 @ z2) * z1 / (z1.norm() ** 3 * z2.norm())) * d1, a),
            }[setting]()
        elif setting.startswith("euc") or setting == "iso_euc":     # L = 1/2 |p - z2|^2
            J = torch.eye(len(p), dtype=W.dtype) if setting in ("euc_nopred", "iso_euc") else W_P
            step = -torch.outer(J.T @ (p - z2) * d1, a)             # IsoLoss: dL/dz1 = p - z2 (Eq. 15)
            if setting == "euc_nosg":
                step += torch.outer((p - z2) * d2, b)
        else:                                                       # L = -cos(p, z2)
            if p.norm() == 0 or z2.norm() == 0:
                continue
            dp = -z2 / (p.norm() * z2.norm()) + (p @ z2) * p / (p.norm() ** 3 * z2.norm())
            J = W_P if setting in ("cos", "cos_nosg") else torch.eye(len(p), dtype=W.dtype)
            step = -torch.outer(J.T @ dp * d1, a)                   # iso_cos: dL/dz1 = dL/dp (Eq. 17)
            if setting == "cos_nosg":
                dz2 = -p / (p.norm() * z2.norm()) + (p @ z2) * z2 / (p.norm() * z2.norm() ** 3)
                step -= torch.outer(dz2 * d2, b)
        total += step
    return total / len(x1)


def views_with(M, N, n, need_zero):
    """Seed and views (float32, toy's sampling: x2 = x1 + sigma eps) of n samples under the paper's
    W0 (M, N); need_zero: the first seed whose batch has a sample with ReLU(W x1) = 0 and one
    with ReLU(W x2) = 0 != ReLU(W x1) (the cosine rules' degenerate cases), else none of either."""
    W0 = toy.initial_weights(toy.DEFAULTS, M, N)
    for seed in range(10_000):
        g = torch.Generator().manual_seed(seed)
        x1 = torch.randn(n, N, generator=g)
        x2 = x1 + SIGMA * torch.randn(n, N, generator=g)
        zero1, zero2 = (x1 @ W0.T <= 0).all(1), (x2 @ W0.T <= 0).all(1)
        both = zero1.any().item() and (zero2 & ~zero1).any().item()
        if (both if need_zero else not (zero1 | zero2).any().item()):
            return W0, seed, x1, x2


def weights_after(run):
    """W after the recorded steps, read from the embeddings of [I; -I] (run.fixed): W^T = phi(I W^T) - phi(-I W^T)
    for the ReLU, (I W^T - (-I W^T)) / 2 without."""
    last = torch.tensor(run.out["trajectory"][-1], dtype=torch.float64)   # (2N, M)
    N = last.shape[0] // 2
    return (last[:N] - last[N:]).T / (1 if run.relu else 2)


@pytest.mark.parametrize("degenerate", [False, True], ids=["M10", "M2-zero-outputs"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("mode", toy.UPDATES)
def test_one_step_of_each_mode_is_its_formula_written_out(mode, relu, degenerate):
    """One simulate step of every row, each mode, on a few samples: W1 = W0 + nan_to_num(lr Delta W)
    with Delta W written out sample by sample (the notebook's rules; the loss's analytic gradient).
    The M=2 batch holds samples with an all-zero ReLU output: the paper's guarded cosine rules
    then make 1e8-scale updates, its unguarded no-predictor rule a non-finite one (the step is skipped)."""
    M, N, n, lr = (2, 6, 8, 0.5) if degenerate else (10, 15, 6, 0.5)
    W0, seed, x1, x2 = views_with(M, N, n, degenerate)
    fixed = torch.cat([torch.eye(N), -torch.eye(N)])
    runs = [toy.Run(s, W0, lr, relu=relu, exact_moments=False, fixed=fixed, updates=mode) for s in toy.SETTINGS]
    toy.simulate(runs, 1, n, seed, points=1)
    W_P = W0.double() @ W0.double().T                                # (W W^T)^alpha, alpha = 1
    for r in runs:
        delta = written_out(r.setting, mode, W0, x1, x2, relu, None if "nopred" in r.setting else W_P)
        expected = W0.double() + torch.nan_to_num(lr * delta, nan=0.0, posinf=0.0, neginf=0.0)
        got = weights_after(r)
        scale = max((expected - W0.double()).abs().max().item(), 1e-6)
        assert ((got - expected).abs().max() / scale).item() < 2e-4, (r.setting, mode, relu)
    skipped = {r.setting: torch.equal(weights_after(r), W0.double()) for r in runs}
    assert skipped == {s: degenerate and toy.skips_steps(s, relu, mode) for s in toy.SETTINGS}
    assert skipped["cos_nopred"] == (degenerate and relu and mode == "paper")
    if relu and degenerate:
        jump = {r.setting: (weights_after(r) - W0.double()).abs().max().item() for r in runs}
        assert (jump["cos_nosg"] > 1e5) == (mode == "paper")         # the 1e-8 guard: 1e8 / batch size


def test_which_paper_rules_are_the_exact_gradient():
    """The README's list: in the linear network every paper rule but cos_nosg is the exact gradient
    (the cosine rules up to their 1e-8 guard); with the ReLU, iso_euc, cos and iso_cos still are,
    the other Euclidean rules are not. Both updates on the same 20,000 samples at W0, in float64."""
    W0 = toy.initial_weights(toy.DEFAULTS, 10, 15).double()
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(20_000, 15, generator=g, dtype=torch.float64)
    x2 = x1 + SIGMA * torch.randn(20_000, 15, generator=g, dtype=torch.float64)
    W_P, W_P_half = isoloss.predictor(W0 @ W0.T, 1.0, normalize=False)

    def both(setting, relu):
        W = W0.clone().requires_grad_()
        z1 = toy.embed(x1, W, relu)
        with torch.set_grad_enabled("nosg" in setting):
            z2 = toy.embed(x2, W, relu)
        pred = (None, None) if "nopred" in setting else (W_P, W_P_half)
        (grad,) = torch.autograd.grad(toy.LOSSES[setting](z1, z2, *pred), W)
        return toy.paper_update(setting, W0, x1, x2, pred[0], relu), -grad

    def relative_difference(setting, relu):
        paper, exact = both(setting, relu)
        return ((paper - exact).norm() / exact.norm()).item()

    for s in toy.SETTINGS:
        assert (relative_difference(s, False) < 1e-6) == (s != "cos_nosg"), s
    for s in ("iso_euc", "cos", "iso_cos"):
        assert relative_difference(s, True) < 1e-6, s
    for s in ("euc", "euc_nosg", "euc_nopred"):
        assert relative_difference(s, True) > 0.05, s
    paper, exact = both("cos_nosg", False)
    assert (paper * exact).sum() / (paper.norm() * exact.norm()) < 0.8     # not the same direction


def test_linear_euclidean_paper_rules_see_a_batch_only_through_its_moments():
    """What makes moment batches exact for the paper's linear Euclidean rules too: a pseudo-batch
    of 2N rows with a real batch's second moments gives the same update (and, as a control,
    does not with a ReLU)."""
    N, n = 15, 40
    W = toy.initial_weights(toy.DEFAULTS, 10, N).double()
    g = torch.Generator().manual_seed(1)
    Y = torch.randn(n, 2 * N, generator=g, dtype=torch.float64) @ toy.mixing(N, SIGMA).T    # rows (x1, x2)
    L = torch.linalg.cholesky(Y.T @ Y / n)
    P = (2 * N) ** 0.5 * L.T                                          # (2N, 2N), P^T P / 2N = Y^T Y / n
    W_P = W @ W.T
    for s in ("euc", "euc_nosg", "euc_nopred", "iso_euc"):
        pred = None if s == "euc_nopred" else W_P
        real = toy.paper_update(s, W, Y[:, :N], Y[:, N:], pred, relu=False)
        pseudo = toy.paper_update(s, W, P[:, :N], P[:, N:], pred, relu=False)
        torch.testing.assert_close(pseudo, real, rtol=1e-9, atol=1e-12)
        relu_real = toy.paper_update(s, W, Y[:, :N], Y[:, N:], pred, relu=True)
        relu_pseudo = toy.paper_update(s, W, P[:, :N], P[:, N:], pred, relu=True)
        assert (relu_real - relu_pseudo).norm() > 0.1 * relu_real.norm()


def test_chunked_views_give_the_full_batch_step_and_skip_only_what_cannot_matter():
    """simulate's chunk option: chunks of 32, 64, ... samples, drawn ahead (Normals) but the same
    as torch.randn per chunk, their means weighted to the full batch's mean (both modes), and a step
    whose paper cosine no-predictor update is non-finite everywhere leaves W as it was."""
    N, n, chunk, seed = 15, 112, 32, 3
    W0 = toy.initial_weights(toy.DEFAULTS, 10, N)
    fixed = torch.cat([torch.eye(N), -torch.eye(N)])
    runs = [toy.Run("cos_nopred", W0, 0.5, fixed=fixed, updates=u) for u in toy.UPDATES]
    toy.simulate(runs, 1, n, seed, points=1, chunk=chunk)
    g = torch.Generator().manual_seed(seed)
    parts = []
    for size in (32, 64, 16):                                          # the chunks, in the order drawn
        x1 = torch.randn(size, N, generator=g)
        parts.append((x1, x1 + SIGMA * torch.randn(size, N, generator=g)))
    x1, x2 = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    for r in runs:
        expected = W0.double() + 0.5 * written_out("cos_nopred", r.updates, W0, x1, x2, False, None)
        torch.testing.assert_close(weights_after(r), expected, rtol=0, atol=2e-6)
    W0, seed, *_ = views_with(2, 6, 8, need_zero=True)                 # a batch with all-zero ReLU outputs
    run = toy.Run("cos_nopred", W0, 0.5, relu=True, fixed=torch.cat([torch.eye(6), -torch.eye(6)]), updates="paper")
    toy.simulate([run], 1, 64, seed, points=1, chunk=8)
    assert torch.equal(weights_after(run), W0.double())


def test_normals_drawn_ahead_are_torch_randns():
    """Normals.randn, cut from blocks drawn ahead (here of 64, so that requests span blocks), returns
    exactly the values of torch.randn calls of the same sizes on the same generator, for sizes that
    are multiples of 16; other sizes continue the same stream of normals."""
    sizes = [(2, 8), (16,), (48, 15), (3, 16), (64,), (160,)]
    g = torch.Generator().manual_seed(5)
    expected = [torch.randn(*shape, generator=g) for shape in sizes]
    with toy.Normals(torch.Generator().manual_seed(5), block=64) as normals:
        got = [normals.randn(*shape) for shape in sizes]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    with toy.Normals(torch.Generator().manual_seed(5), block=64) as normals:
        odd = torch.cat([normals.randn(7, 3).flatten(), normals.randn(43).flatten()])     # 21 + 43 = 64
    assert torch.equal(odd, torch.randn(64, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(torch.randn(7, 3, generator=torch.Generator().manual_seed(5)).flatten(), odd[:21])


def test_paper_relu_no_predictor_euclidean_rule_has_zero_mean_and_the_gradient_does_not():
    """Why the paper's Euclidean + ReLU no-predictor panel stays flat and the exact one grows: the
    rule omits the ReLU derivative, and its expected update E[(phi(W x + W eps) - phi(W x)) x^T] is
    0 by x -> -x symmetry (E over eps of phi(a + d) - phi(a) is even in a); the gradient's, with
    phi'(W x), makes tr(W W^T) grow. 40 batches of 5,000 antithetic pairs x +- sigma eps (their
    first-order noise cancels), float64, at W0."""
    W = toy.initial_weights(toy.DEFAULTS, 10, 15).double()
    g = torch.Generator().manual_seed(0)
    paper, growth, paper_growth = [], [], []
    for _ in range(40):
        x = torch.randn(5_000, 15, generator=g, dtype=torch.float64)
        eps = SIGMA * torch.randn(5_000, 15, generator=g, dtype=torch.float64)
        x1, x2 = torch.cat([x, x]), torch.cat([x + eps, x - eps])
        delta = toy.paper_update("euc_nopred", W, x1, x2, None, relu=True)
        exact = -((x1 @ W.T).relu() - (x2 @ W.T).relu()) * (x1 @ W.T > 0)          # -(z1 - z2) * phi'
        paper.append(delta)
        paper_growth.append(2 * (delta * W).sum())                                   # d tr(W W^T) / (eta dt)
        growth.append(2 * (exact.T @ x1 / len(x1) * W).sum())
    paper, growth, paper_growth = torch.stack(paper), torch.stack(growth), torch.stack(paper_growth)
    t_paper = paper.mean(0) / (paper.std(0) / len(paper) ** 0.5)
    assert t_paper.abs().max() < 4.5                                   # 150 entries, all consistent with 0
    assert growth.mean() > 10 * growth.std() / len(growth) ** 0.5     # the gradient's: clearly positive
    assert paper_growth.mean().abs() < 0.1 * growth.mean()


# ---------------------------------------------------------------- The speed-ups against the plain loop

def test_moment_batch_has_the_wishart_moments():
    """Mean and variance of the pseudo-batch's second moments equal those of n real samples."""
    n, N, draws = 40, 3, 20_000
    torch.manual_seed(0)
    S = torch.stack([torch.cat(toy.draw_moment_batch(n, N, SIGMA), 1) for _ in range(draws)]).double()
    S = S.mT @ S / S.shape[1]                                      # (draws, 2N, 2N) second moments
    A = toy.mixing(N, SIGMA).double()
    Sigma = A @ A.T                                                # [[I, I], [I, (1 + sigma^2) I]]
    var = (Sigma ** 2 + torch.outer(Sigma.diagonal(), Sigma.diagonal())) / n   # Wishart variance
    torch.testing.assert_close(S.mean(0), Sigma, atol=4 * (var.max() / draws) ** 0.5, rtol=0)
    assert ((S.var(0) / var - 1).abs() < 0.06).all()


def test_moment_batch_gives_the_plain_loops_update_distribution():
    """One gradient step of each Euclidean row: moment batches vs real samples, same mean and covariance."""
    n, draws = 60, 1_500
    W0 = toy.initial_weights(toy.DEFAULTS, 2, 4)

    def updates(exact_moments):
        out = []
        for i in range(draws):
            runs = [toy.Run(s, W0, 1.0, exact_moments=exact_moments, fixed=torch.eye(4))   # records W^T
                    for s in ("euc", "euc_nosg", "iso_euc")]
            toy.simulate(runs, 1, n, seed=2 * i + exact_moments, moment_samples=n, points=1)
            out.append(torch.tensor([r.out["trajectory"][-1] for r in runs]).flatten())
        return torch.stack(out).double()

    a, b = updates(True), updates(False)
    assert all(toy.Run(s, W0, 1.0).moments for s in ("euc", "euc_nosg", "iso_euc"))
    se = (a.var(0) / draws + b.var(0) / draws).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 5 * se).all()
    assert ((a.std(0) / b.std(0) - 1).abs() < 0.1).all()


def test_reduced_sample_nopred_panels_stay_within_the_full_sample_spread():
    """The 100,000-step panels that need real samples (no predictor: cosine, cosine + ReLU,
    Euclidean + ReLU) run on --nopred-samples antithetic views per step. Over a shortened horizon
    their mean eigenvalues agree with the 50,000-sample plain loop's within the combined standard
    error of the two (aggregated over the M modes of each panel), and that error is small next to
    how far the cosine panels move. (Over 20,000 steps, 4 runs at 512 antithetic samples agreed
    with a 50,000-sample run to 0.4%, and, for the ReLU panels, within 1-2 run-to-run sd.)"""
    steps, n, n_full = 300, toy.DEFAULTS["nopred_samples"], 50_000
    rows = [("cos_nopred", False), ("cos_nopred", True), ("euc_nopred", True)]
    W0 = toy.initial_weights(toy.DEFAULTS, 10, 15)

    def final(samples, seed, antithetic):
        runs = [toy.Run(s, W0, toy.LR[s], relu=relu) for s, relu in rows]
        toy.simulate(runs, steps, samples, seed, antithetic, points=1)
        return torch.stack([torch.tensor(r.out["eigenvalues"][-1]) for r in runs]).double()   # (rows, M)

    ours = torch.stack([final(n, seed, True) for seed in range(12)])            # the toy's panels
    full = torch.stack([final(n_full, 100 + seed, False) for seed in range(3)])  # the plain loop
    distance = (ours.mean(0) - full.mean(0)).norm(dim=-1)                       # (rows,)
    stderr = (ours.var(0) / len(ours) + full.var(0) / len(full)).sum(-1).sqrt()
    assert (distance < 3 * stderr).all()
    moved = (full.mean(0) - toy.eigenvalues(W0).double()).norm(dim=-1)
    assert (stderr[:2] < 0.25 * moved[:2]).all()                                # the cosine rows move


# ---------------------------------------------------------------- The command line

@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``python toy.py --quick --updates both`` (parallel jobs, the default), its output folder and printout."""
    out = tmp_path_factory.mktemp("quick")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        toy.main(["--quick", "--updates", "both", "--out", str(out)])
    return out, printed.getvalue()


def test_quick_run_writes_figures_and_json(quick):
    out, printed = quick
    for name in ("fig2_trajectories", "fig2_eigenvalues", "fig5_initializations", "fig6_relu", "fig6_trajectories"):
        for suffix in ("", "_paper"):
            assert (out / f"{name}{suffix}.png").stat().st_size > 10_000
    for name in ("fig2_exact_vs_paper", "fig6_exact_vs_paper"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    for mode, file in (("exact", "toy_results.json"), ("paper", "toy_results_paper.json")):
        res = json.loads((out / file).read_text())
        assert set(res) >= {"config", "fig2", "fig5", "fig6", "trajectories", "fig6_trajectories", "seconds"}
        assert res["config"]["updates"] == mode
        assert res["config"]["samples"] == toy.QUICK["samples"] and res["config"]["seed"] == 2
        for fig in ("fig2", "fig6"):
            assert set(res[fig]) == set(toy.SETTINGS)
            for s, r in res[fig].items():
                assert len(r["steps"]) >= 200 and len(r["eigenvalues"]) == len(r["steps"])
                assert r["steps"][-1] == (toy.QUICK["nopred_steps"] if "nopred" in s else toy.QUICK["steps"])
                assert all(len(e) == 10 for e in r["eigenvalues"])
                assert (r["theory"] is not None) == (fig == "fig2" and s in toy.RATE)
        for fig in ("trajectories", "fig6_trajectories"):
            assert all(len(r["eigenvalues"][-1]) == 2 for r in res[fig].values())
        assert len(res["fig5"]["euc"]) == len(res["fig5"]["cos"]) == 3
    assert "fig2 euc " in printed and "deviation from theory" in printed and "paper: fig6 cos_nopred" in printed


def test_both_modes_see_the_same_samples(quick):
    """Same seeds, same samples: where the paper's rule is the exact gradient (linear Euclidean
    rows; the cosine rows up to the 1e-8 guard) the two modes' panels agree; cos_nosg's do not."""
    exact, paper = (json.loads((quick[0] / f).read_text())["fig2"] for f in ("toy_results.json", "toy_results_paper.json"))

    def eig(res, s):
        return torch.tensor(res[s]["eigenvalues"], dtype=torch.float64)
    for s in ("euc", "euc_nosg", "euc_nopred", "iso_euc"):
        torch.testing.assert_close(eig(paper, s), eig(exact, s), rtol=1e-9, atol=1e-20)
    for s in ("cos", "cos_nopred", "iso_cos"):
        torch.testing.assert_close(eig(paper, s), eig(exact, s), rtol=1e-3, atol=1e-6)
    assert ((eig(paper, "cos_nosg")[-1] / eig(exact, "cos_nosg")[-1]).log().abs() > 1).any()


@pytest.mark.parametrize("mode", toy.UPDATES)
def test_results_do_not_depend_on_only_or_jobs_or_updates(quick, tmp_path, mode):
    """Each figure's jobs have their own random streams: --only fig5 --jobs 1 --updates MODE
    (in-process, default threads) repeats the parallel two-mode run's fig5 up to the round-off of
    a different thread count."""
    toy.main(["--quick", "--only", "fig5", "--jobs", "1", "--updates", mode, "--out", str(tmp_path)])
    file = toy.RESULTS[mode]
    assert (tmp_path / "fig5_initializations{}.png".format("" if mode == "exact" else "_paper")).exists()
    assert not (tmp_path / "fig2_eigenvalues.png").exists() and not (tmp_path / "fig2_exact_vs_paper.png").exists()
    alone = json.loads((tmp_path / file).read_text())["fig5"]
    together = json.loads((quick[0] / file).read_text())["fig5"]
    for loss in ("euc", "cos"):
        for a, b in zip(alone[loss], together[loss]):
            torch.testing.assert_close(torch.tensor(a["eigenvalues"]), torch.tensor(b["eigenvalues"]),
                                       rtol=1e-4, atol=1e-7)


def test_comparison_figures_need_both_modes_of_one_configuration(quick, tmp_path):
    """The exact-vs-paper figures come from the two results files; none from one file alone, or
    from two runs with different settings."""
    exact, paper = (json.loads((quick[0] / toy.RESULTS[m]).read_text()) for m in toy.UPDATES)
    (tmp_path / toy.RESULTS["exact"]).write_text(json.dumps(exact))
    assert toy.comparison_figures(tmp_path) == []
    paper["config"]["seed"] = 3
    (tmp_path / toy.RESULTS["paper"]).write_text(json.dumps(paper))
    with contextlib.redirect_stdout(io.StringIO()):
        assert toy.comparison_figures(tmp_path) == []
    paper["config"]["seed"] = 2
    (tmp_path / toy.RESULTS["paper"]).write_text(json.dumps(paper))
    assert [p.name for p in toy.comparison_figures(tmp_path)] == ["fig2_exact_vs_paper.png", "fig6_exact_vs_paper.png"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be positive"),
    (["--nopred-steps", "0"], "--nopred-steps must be positive"),
    (["--samples", "29"], "--samples must be at least 30 (a moment batch needs n >= 2N)"),    # 2N, N = 15
    (["--nopred-samples", "1"], "--nopred-samples must be at least 2 (one antithetic pair)"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--only", "fig3"], "argument --only: invalid choice: 'fig3'"),
    (["--updates", "notebook"], "argument --updates: invalid choice: 'notebook'"),
    (["--steps", "1.5"], "argument --steps: invalid int value: '1.5'"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    """Each bad argument: argparse's exit code 2, its own message, nothing written. (After --quick
    --only fig5 --jobs 1, so that a check gone missing costs a short run, not a full one.)"""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        toy.main(["--quick", "--only", "fig5", "--jobs", "1", "--out", str(out), *argv])
    assert exit_.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_defaults_are_the_papers():
    """The values of Sec. 3 and the paper's notebook."""
    assert toy.DEFAULTS["samples"] == 50_000 and toy.DEFAULTS["sigma"] == 0.1 and toy.DEFAULTS["alpha"] == 1
    assert toy.DEFAULTS["steps"] == 1_500 and toy.DEFAULTS["nopred_steps"] == 100_000
    assert (toy.DEFAULTS["N"], toy.DEFAULTS["M"], toy.DEFAULTS["traj_N"], toy.DEFAULTS["traj_M"]) == (15, 10, 6, 2)
    assert toy.DEFAULTS["traj_lr"] == 0.01 and (toy.DEFAULTS["traj_inputs"], toy.DEFAULTS["traj_shown"]) == (5_000, 20)
    assert toy.LR == {"euc": 0.01, "euc_nosg": 0.01, "iso_euc": 0.01,
                      "euc_nopred": 0.1, "cos": 0.1, "cos_nosg": 0.1, "cos_nopred": 0.1, "iso_cos": 0.1}


def test_default_initial_conditions_are_the_notebooks():
    """torch.manual_seed(2); W0 = randn(M, N) / 4; Fig. 5 (M=2, N=6) adds 2 W0 and randn / 2 drawn
    right after W0; both losses of Fig. 5 and the first of them reused from the trajectory panels."""
    W0 = toy.initial_weights(toy.DEFAULTS, 10, 15)
    torch.manual_seed(2)
    assert torch.equal(W0, torch.randn(10, 15) / 4)
    torch.manual_seed(2)
    W0 = torch.randn(2, 6) / 4
    inits = [W0, 2 * W0, torch.randn(2, 6) / 2]
    fig5 = toy.build_runs(toy.DEFAULTS, "fig5")["fig5"]
    together = toy.build_runs(toy.DEFAULTS)
    for loss in ("euc", "cos"):
        for runs in (fig5[loss], together["fig5"][loss]):
            assert [r.setting for r in runs] == [loss] * 3 and all(r.lr == 0.01 for r in runs)
            assert all(torch.equal(r.W0, W) for r, W in zip(runs, inits))
        assert together["fig5"][loss][0] is together["trajectories"][loss]


def test_makespan_is_the_process_pools_greedy_packing():
    """Hand-computed: each job goes to the first free worker, in the order given. [3, 3, 2, 2, 2] on
    two workers ends at 7 (3+2+2 | 3+2), although 6 (3+3 | 2+2+2) is possible."""
    assert toy.makespan([3, 3, 2, 2, 2], 2) == 7
    assert toy.makespan([5, 1, 1, 1], 2) == 5 and toy.makespan([1, 1, 1, 5], 2) == 6
    assert toy.makespan([3, 3, 2, 2, 2], 1) == 12 and toy.makespan([3, 3, 2, 2, 2], 9) == 3


def test_bench_projects_every_job_and_packs_them_on_the_workers():
    """--bench --quick --jobs 2: one line per job, together every run of the figures once with its
    step count (hand-counted: Figs. 2 and 6 have 6 runs of 200 steps and 2 no-predictor runs of
    2,000 each, the two M=2 panels 8 runs each and Fig. 5 4 more, of 200 steps: 14,400 run-steps),
    and a projection between the best packing of the jobs' seconds on two workers (brute force)
    and 3/2 of it (Graham's bound for any order)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        plain, packed, seconds = toy.main(["--bench", "--quick", "--jobs", "2"])
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("  toy job ")]
    runs_steps = [line.rsplit(":", 1)[0].split()[-5:] for line in lines]           # [runs, 'runs', 'x', steps, 'steps']
    assert len(lines) == len(seconds) and len({line.split("  ")[1] for line in lines}) == len(lines)
    assert sum(int(r) for r, *_ in runs_steps) == 36
    assert sum(int(r) * int(n) for r, _, _, n, _ in runs_steps) == 14_400
    best = min(max(sum(s for s, side in zip(seconds, sides) if side == w) for w in (0, 1))
               for sides in itertools.product((0, 1), repeat=len(seconds)))             # every split in two
    assert best - 1e-9 <= packed <= 1.5 * best + 1e-9 and plain > 0
    assert f"ratio: {plain / packed:.0f}x" in printed.getvalue()
