"""isoloss.py against things computed another way: the paper's eigenspace forms
(Lemma 1), its analytic representational gradients (Eqs. 5, 6, App. C), naive
loops, float64 and invariances. CPU only, a few seconds."""
import re
from pathlib import Path

import pytest
import torch

import isoloss

B, M = 7, 5
DT = torch.float64


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)                 # every test sees the same random inputs, whatever runs first


def rand_C(m=M, seed=0, negative=False):
    """A random symmetric PSD (or, with ``negative``, indefinite) matrix and its spectrum."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=DT))
    s = torch.rand(m, generator=g, dtype=DT) * 3 + 0.1
    if negative:
        s[0] = -0.5
    return (Q * s) @ Q.T, Q, s


def views(seed=1, b=B, m=M):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, m, generator=g, dtype=DT)
    z2 = z1 + 0.3 * torch.randn(b, m, generator=g, dtype=DT)
    return z1.requires_grad_(), z2.requires_grad_()


def eig(W_P):
    """Eigendecomposition W_P = U D U^T, computed independently in float64."""
    lam, U = torch.linalg.eigh(W_P.to(DT))
    return lam, U


def grad(loss, x):
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return g


@pytest.fixture
def setting():
    C, _, _ = rand_C()
    W_P, W_P_half = isoloss.predictor(C)
    z1, z2 = views()
    return z1, z2, W_P, W_P_half


# ---------------------------------------------------------------- correlation / EMA

def test_correlation_matches_naive_loop_and_is_detached():
    z = torch.randn(9, 4, dtype=DT, requires_grad=True)
    naive = sum(torch.outer(z[i], z[i]) for i in range(9)) / 9
    C = isoloss.correlation(z)
    assert not C.requires_grad
    torch.testing.assert_close(C, naive.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_correlation_is_float32_for_half_inputs_and_under_autocast(dtype):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(256, 8, generator=g) * 300).to(dtype)   # fp16 z^T z would overflow (> 65504)
    expected = z.double().T @ z.double() / 256
    with torch.autocast("cpu", dtype=torch.bfloat16):
        C = isoloss.correlation(z)
    assert C.dtype == torch.float32 and torch.isfinite(C).all()
    # float32 accumulation: error ~ 1e-7 of the largest entry (bf16 would be ~1e-2)
    torch.testing.assert_close(C.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_ema_update_k_steps_equals_closed_form_and_is_pure():
    tau, C0 = 0.9, rand_C()[0]
    zs = [torch.randn(6, M, dtype=DT) for _ in range(5)]
    C = C0.clone()
    for z in zs:
        C = isoloss.ema_update(C, z, tau)
    k = len(zs)
    closed = tau ** k * C0 + sum((1 - tau) * tau ** (k - 1 - j) * (z.T @ z / 6) for j, z in enumerate(zs))
    torch.testing.assert_close(C, closed)
    C_before = C0.clone()
    isoloss.ema_update(C0, zs[0], tau)
    assert torch.equal(C0, C_before)


# ---------------------------------------------------------------- predictor (Eq. 1)

@pytest.mark.parametrize("alpha,eps", [(0.5, 0.0), (1.0, 0.25), (1.0, 0.0), (2.0, 0.1)])
def test_predictor_eigenvalues_follow_eq1(alpha, eps):
    C, Q, s = rand_C(negative=True)
    W_P, W_P_half = isoloss.predictor(C, alpha, eps)
    expected = (s.clamp(min=0) / s.max() + eps) ** alpha          # from the construction of C
    lam, U = eig(W_P)
    torch.testing.assert_close(lam, expected.sort().values)
    torch.testing.assert_close(W_P, W_P.T)
    torch.testing.assert_close(W_P_half @ W_P_half, W_P)
    # eigenvectors are C's: W_P is diagonal in C's eigenbasis Q
    torch.testing.assert_close(Q.T @ W_P @ Q, torch.diag(expected))
    assert not W_P.requires_grad and not W_P_half.requires_grad


def test_directpred_squared_is_normalised_C():
    C, _, s = rand_C()
    W_P, _ = isoloss.predictor(C, alpha=0.5, eps=0.0)
    torch.testing.assert_close(W_P @ W_P, C / s.max())


def test_directcopy_is_C_over_smax_plus_quarter_identity():
    C, _, s = rand_C()
    W_P, _ = isoloss.predictor(C, alpha=1.0, eps=0.25)
    torch.testing.assert_close(W_P, C / s.max() + 0.25 * torch.eye(M, dtype=DT))


def test_unnormalised_alpha_one_returns_C():
    C, _, _ = rand_C()
    W_P, W_P_half = isoloss.predictor(C, 1.0, normalize=False)
    torch.testing.assert_close(W_P, C)
    W = torch.randn(3, 6, dtype=DT)                               # the toy: W_P = W W^T
    torch.testing.assert_close(isoloss.predictor(W @ W.T, 1.0, normalize=False)[0], W @ W.T)


def denman_beavers_sqrt(A, iters=50):
    """The principal square root of a positive definite A by the Denman-Beavers iteration (no eigh)."""
    Y, Z = A.clone(), torch.eye(len(A), dtype=A.dtype)
    for _ in range(iters):
        Y, Z = (Y + torch.linalg.inv(Z)) / 2, (Z + torch.linalg.inv(Y)) / 2
    return Y


@pytest.mark.parametrize("alpha,eps", [(1.0, 0.25), (0.5, 0.25), (1.0, 0.0), (0.5, 0.0)])
def test_predictor_of_repeated_and_zero_eigenvalues_equals_eq1_without_eigh(alpha, eps):
    """A collapsing run's C: a repeated eigenvalue, a tight cluster and six zeros out of 16 (where a general
    `eig`, as in the reference code, returns non-orthogonal eigenvectors). W_P = (C / s_max + eps I)^alpha
    from matrix functions without an eigendecomposition: alpha = 1 directly, alpha = 0.5 and W_P^{1/2} by
    Denman-Beavers; for eps = 0 (singular) W_P must be the PSD root of C / s_max."""
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=DT))
    s = torch.tensor([3.0, 2, 2, 2, 1, 0.5, 1e-4, 1e-4 * (1 + 1e-9), 1e-4 * (1 - 1e-9), 1e-3] + [0.0] * 6, dtype=DT)
    C = (Q * s) @ Q.T
    C = (C + C.T) / 2
    A = C / 3.0 + eps * torch.eye(16, dtype=DT)                   # s_max = 3 by construction
    W_P, W_P_half = isoloss.predictor(C, alpha, eps)
    if eps > 0:
        expected = A if alpha == 1 else denman_beavers_sqrt(A)
        torch.testing.assert_close(W_P, expected, atol=1e-10, rtol=0)
        torch.testing.assert_close(W_P_half, denman_beavers_sqrt(expected), atol=1e-10, rtol=0)
    elif alpha == 1:
        torch.testing.assert_close(W_P, A, atol=1e-10, rtol=0)
        torch.testing.assert_close(W_P_half @ W_P_half, A, atol=1e-10, rtol=0)
    else:                                                        # the unique PSD square root of A
        torch.testing.assert_close(W_P @ W_P, A, atol=1e-10, rtol=0)
        assert torch.linalg.eigvalsh(W_P).min() > -1e-10
        torch.testing.assert_close(W_P_half @ W_P_half, W_P, atol=1e-10, rtol=0)
    torch.testing.assert_close(W_P, W_P.T, atol=1e-12, rtol=0)


def test_predictor_is_rotation_equivariant():
    C, _, _ = rand_C()
    R, _ = torch.linalg.qr(torch.randn(M, M, dtype=DT))
    W_P, _ = isoloss.predictor(C)
    W_P_rot, _ = isoloss.predictor(R @ C @ R.T)
    torch.testing.assert_close(W_P_rot, R @ W_P @ R.T)


def test_all_zero_C_is_finite():
    C = torch.zeros(M, M)
    for alpha, eps in [(0.5, 0.0), (1.0, 0.25)]:
        W_P, W_P_half = isoloss.predictor(C, alpha, eps)
        assert torch.isfinite(W_P).all() and torch.isfinite(W_P_half).all()
        torch.testing.assert_close(W_P, eps ** alpha * torch.eye(M))


def test_predictor_retries_a_failing_float32_eigh_in_float64():
    """A finite float32 C whose largest eigenvalue (8 * 3e38) overflows float32: eigh returns inf.
    The retry in float64 gives the predictor of C / 3e38, which float32 handles (Eq. 1 normalises
    s / max(s), so W_P does not depend on C's scale)."""
    u = torch.randn(8, 3, dtype=DT)
    C = (u @ u.T + 3 * torch.eye(8, dtype=DT)) / 11                # entries of order 1, PSD
    big = (C * 3e38).float()
    assert torch.isfinite(big).all() and not torch.isfinite(torch.linalg.eigvalsh(big)).all()
    W_P, W_P_half = isoloss.predictor(big, 0.5, 0.0)
    assert W_P.dtype == torch.float32 and torch.isfinite(W_P).all()
    expected = isoloss.predictor(C, 0.5, 0.0)
    torch.testing.assert_close(W_P.double(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W_P_half.double(), expected[1], rtol=1e-5, atol=1e-6)


def test_predictor_of_a_non_finite_C_raises_linalg_error():
    C = rand_C()[0].float()
    C[0, 1] = C[1, 0] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError):
        isoloss.predictor(C)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_predictor_half_input_works_in_float32(dtype):
    C, _, _ = rand_C()
    W_P, _ = isoloss.predictor(C.to(dtype))
    assert W_P.dtype == torch.float32
    torch.testing.assert_close(W_P.double(), isoloss.predictor(C.to(dtype).double())[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- Lemma 1 (Eqs. 3, 4)

def test_lemma1_euclidean_eigenspace_form(setting):
    z1, z2, W_P, _ = setting
    lam, U = eig(W_P)
    h1, h2 = z1 @ U, z2 @ U                                        # z_hat = U^T z, row-wise
    eq3 = 0.5 * ((lam * h1 - h2) ** 2).sum(1).mean()
    torch.testing.assert_close(isoloss.loss_euc(z1, z2, W_P), eq3)


def test_lemma1_cosine_eigenspace_form(setting):
    z1, z2, W_P, _ = setting
    lam, U = eig(W_P)
    h1, h2 = z1 @ U, z2 @ U
    eq4 = -((lam * h1 * h2).sum(1) / ((lam * h1).norm(dim=1) * h2.norm(dim=1))).mean()
    torch.testing.assert_close(isoloss.loss_cos(z1, z2, W_P), eq4)


def test_cosine_matches_torch_cosine_similarity(setting):
    z1, z2, W_P, _ = setting
    expected = -torch.nn.functional.cosine_similarity(z1 @ W_P.T, z2, dim=1).mean()
    torch.testing.assert_close(isoloss.loss_cos(z1, z2, W_P), expected)
    torch.testing.assert_close(isoloss.loss_cos(z1, z2), -torch.nn.functional.cosine_similarity(z1, z2).mean())


# ---------------------------------------------------------------- Representational gradients (Eqs. 5, 6)

def eigen_grad(loss_fn, z1, z2, W_P, *extra):
    """d loss / d z_hat1 (per sample: times B), by autograd in the eigenbasis of W_P."""
    lam, U = eig(W_P)
    h1 = (z1.detach() @ U).requires_grad_()
    return grad(loss_fn(h1 @ U.T, z2, W_P, *extra), h1) * z1.shape[0], lam, h1.detach(), z2.detach() @ U


def test_eq5_euclidean_representational_gradient(setting):
    z1, z2, W_P, _ = setting
    g, lam, h1, h2 = eigen_grad(isoloss.loss_euc, z1, z2, W_P)
    torch.testing.assert_close(g, (lam * h1 - h2) * lam)           # (D z1 - z2) D


def cos_eq6(lam, h1, h2):
    """Eq. 6: the gradient of L_cos with respect to z_hat1, per sample."""
    n1, n2 = (lam * h1).norm(dim=1, keepdim=True), h2.norm(dim=1, keepdim=True)
    dot = (lam * h1 * h2).sum(1, keepdim=True)
    return -lam * h2 / (n1 * n2) + dot / (n1 ** 3 * n2) * lam ** 2 * h1


def test_eq6_cosine_representational_gradient(setting):
    z1, z2, W_P, _ = setting
    g, lam, h1, h2 = eigen_grad(isoloss.loss_cos, z1, z2, W_P)
    torch.testing.assert_close(g, cos_eq6(lam, h1, h2))


def test_eq10_coupled_form_of_the_cosine_gradient(setting):
    """Theorem 2 (Eq. 10) rewrites Eq. 6 as a sum over k != m: the same numbers."""
    z1, z2, W_P, _ = setting
    g, lam, h1, h2 = eigen_grad(isoloss.loss_cos, z1, z2, W_P)
    n1, n2 = (lam * h1).norm(dim=1), h2.norm(dim=1)
    eq10 = torch.zeros_like(g)
    for m in range(M):
        for k in range(M):
            if k != m:
                eq10[:, m] += lam[k] * (lam[k] * h1[:, k] ** 2 * h2[:, m] - lam[m] * h1[:, m] * h1[:, k] * h2[:, k])
        eq10[:, m] *= lam[m] / (n1 ** 3 * n2)
    torch.testing.assert_close(-g, eq10)                           # dz/dt = -eta dL/dz


# ---------------------------------------------------------------- IsoLoss (Eqs. 15, 17; App. C.5)

def test_iso_euc_has_euc_value_and_gradient_W_P_z1_minus_z2(setting):
    z1, z2, W_P, _ = setting
    loss = isoloss.loss_iso_euc(z1, z2, W_P)
    torch.testing.assert_close(loss, isoloss.loss_euc(z1, z2, W_P))
    torch.testing.assert_close(grad(loss, z1) * B, (z1 @ W_P.T - z2).detach())
    lam, U = eig(W_P)
    g, _, h1, h2 = eigen_grad(lambda a, b, W: isoloss.loss_iso_euc(a, b, W), z1, z2, W_P)
    torch.testing.assert_close(g, lam * h1 - h2)                   # App. C.5.1: no leading lambda_m


def test_iso_cos_gradient_is_the_desired_derivative_of_appendix_c52(setting):
    z1, z2, W_P, W_P_half = setting
    g, lam, h1, h2 = eigen_grad(isoloss.loss_iso_cos, z1, z2, W_P, W_P_half)
    n1, n2 = (lam * h1).norm(dim=1, keepdim=True), h2.norm(dim=1, keepdim=True)
    dot = (lam * h1 * h2).sum(1, keepdim=True)
    desired = -h2 / (n1 * n2) + dot / (n1 ** 3 * n2) * lam * h1   # Eq. 6 with one lambda_m fewer
    torch.testing.assert_close(g, desired)


def test_iso_cos_value_from_eq17_term_by_term(setting):
    z1, z2, W_P, W_P_half = setting
    p = z1 @ W_P.T
    n1, n2 = p.norm(dim=1), z2.norm(dim=1)
    first = -(z1 * z2).sum(1) / (n1 * n2)
    second = 0.5 * (p * z2).sum(1) / (n1 ** 3 * n2) * ((z1 @ W_P_half.T) ** 2).sum(1)
    torch.testing.assert_close(isoloss.loss_iso_cos(z1, z2, W_P, W_P_half), (first + second).mean())


# ---------------------------------------------------------------- IsoLoss as a straight-through predictor

PAIRS = [("loss_euc", lambda z1, z2, W, Wh: isoloss.loss_iso_euc(z1, z2, W)),
         ("loss_cos", lambda z1, z2, W, Wh: isoloss.loss_iso_cos(z1, z2, W, Wh))]


@pytest.mark.parametrize("base,iso", PAIRS)
@pytest.mark.parametrize("stacked", [False, True])
def test_base_loss_of_straight_through_has_base_value_and_iso_gradient(base, iso, stacked):
    """base(straight_through(z1, W_P), z2): the value of base(z1, z2, W_P), the z1-gradient of the
    IsoLoss (Eqs. 15, 17), in float64 to round-off; with leading dimensions (S, B, M) too."""
    shape = (3, B, M) if stacked else (B, M)
    Cs = torch.stack([rand_C(seed=s)[0] for s in range(3)]) if stacked else rand_C()[0]
    W_P, W_P_half = isoloss.predictor(Cs, 0.5, 0.05)
    z1 = torch.randn(shape, dtype=DT, requires_grad=True)
    z2 = z1.detach() + 0.3 * torch.randn(shape, dtype=DT)
    fn = getattr(isoloss, base)
    st = fn(isoloss.straight_through(z1, W_P), z2)                 # (S,) or ()
    torch.testing.assert_close(st, fn(z1, z2, W_P), rtol=1e-12, atol=1e-12)
    (g_st,) = torch.autograd.grad(st.sum(), z1)
    (g_iso,) = torch.autograd.grad(iso(z1, z2, W_P, W_P_half).sum(), z1)
    torch.testing.assert_close(g_st, g_iso, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("base,iso", PAIRS)
def test_straight_through_under_autocast(base, iso, dtype):
    """Under autocast with half inputs: float32 math (value as the base loss computes it), the
    gradient of the IsoLoss, returned in the input's dtype; both close to float64."""
    C = rand_C()[0]
    W_P, W_P_half = (w.float() for w in isoloss.predictor(C, 0.5))
    z1 = torch.randn(B, M).to(dtype).requires_grad_()
    z2 = (z1.detach().float() + 0.3 * torch.randn(B, M)).to(dtype)
    fn = getattr(isoloss, base)
    with torch.autocast("cpu", dtype=dtype):
        p = isoloss.straight_through(z1, W_P)
        st, ref = fn(p, z2), fn(z1, z2, W_P)
        (g_st,) = torch.autograd.grad(st, z1)
        (g_iso,) = torch.autograd.grad(iso(z1, z2, W_P, W_P_half), z1)
    assert p.dtype == torch.float32 and g_st.dtype == dtype
    torch.testing.assert_close(st, ref, rtol=1e-6, atol=1e-6)
    z1_64 = z1.detach().double().requires_grad_()
    exact = fn(isoloss.straight_through(z1_64, W_P.double()), z2.double())
    torch.testing.assert_close(st.double(), exact, rtol=1e-5, atol=1e-5)
    (g_exact,) = torch.autograd.grad(exact, z1_64)
    tol = dict(rtol=2e-2, atol=1e-2 * g_exact.abs().max().item())  # the gradients' half-precision rounding
    torch.testing.assert_close(g_st.double(), g_exact, **tol)
    torch.testing.assert_close(g_iso.double(), g_exact, **tol)


def test_straight_through_passes_any_distances_gradient_unchanged(setting):
    """A distance of the user's own (smooth L1): dL/dz1 through straight_through == dL/dp at p = W_P z1."""
    z1, z2, W_P, _ = setting
    distance = lambda p, t: torch.nn.functional.smooth_l1_loss(p, t.detach(), beta=0.5)
    p = (z1.detach() @ W_P.T).requires_grad_()
    p_st = isoloss.straight_through(z1, W_P)
    torch.testing.assert_close(p_st, p, rtol=0, atol=0)             # the forward value is W_P z1 exactly
    torch.testing.assert_close(grad(distance(p_st, z2), z1), grad(distance(p, z2), p))


# ---------------------------------------------------------------- Ablations: stop-grad and predictor (Eqs. 12-14)

ALL_LOSSES = [
    ("euc", lambda z1, z2, W, Wh: isoloss.loss_euc(z1, z2, W)),
    ("cos", lambda z1, z2, W, Wh: isoloss.loss_cos(z1, z2, W)),
    ("euc_nopred", lambda z1, z2, W, Wh: isoloss.loss_euc(z1, z2)),
    ("cos_nopred", lambda z1, z2, W, Wh: isoloss.loss_cos(z1, z2)),
    ("iso_euc", lambda z1, z2, W, Wh: isoloss.loss_iso_euc(z1, z2, W)),
    ("iso_cos", lambda z1, z2, W, Wh: isoloss.loss_iso_cos(z1, z2, W, Wh)),
]


@pytest.mark.parametrize("name,fn", ALL_LOSSES)
def test_stop_grad_blocks_the_target_branch(setting, name, fn):
    z1, z2, W_P, W_P_half = setting
    g1, g2 = torch.autograd.grad(fn(z1, z2, W_P, W_P_half), (z1, z2), allow_unused=True)
    assert g2 is None and torch.isfinite(g1).all() and g1.abs().sum() > 0


def test_no_stop_grad_euclidean_target_gradient(setting):
    z1, z2, W_P, _ = setting
    g1, g2 = torch.autograd.grad(isoloss.loss_euc(z1, z2, W_P, stop_grad=False), (z1, z2))
    err = (z1 @ W_P.T - z2).detach()
    torch.testing.assert_close(g2 * B, -err)
    torch.testing.assert_close(g1 * B, err @ W_P)
    # App. C.1 with z1 = z2 = z: the total gradient is (lambda z_hat - z_hat)(lambda - 1), hence Eq. 12
    lam, U = eig(W_P)
    h = (z1.detach() @ U).requires_grad_()
    z = h @ U.T
    g = grad(isoloss.loss_euc(z, z, W_P, stop_grad=False), h) * B
    torch.testing.assert_close(g, (lam * h - h) * (lam - 1))


def test_no_stop_grad_cosine_target_gradient(setting):
    z1, z2, W_P, _ = setting
    g2 = grad(isoloss.loss_cos(z1, z2, W_P, stop_grad=False), z2) * B
    p = (z1 @ W_P.T).detach()
    n1, n2 = p.norm(dim=1, keepdim=True), z2.detach().norm(dim=1, keepdim=True)
    cos = (p * z2.detach()).sum(1, keepdim=True) / (n1 * n2)
    torch.testing.assert_close(g2, -(p / (n1 * n2) - cos * z2.detach() / n2 ** 2))


def test_no_predictor_cosine_conserves_the_norm_to_first_order():
    """App. C.4: the no-predictor cosine gradient is orthogonal to z1 (sum of eigenvalues conserved)."""
    z1, z2 = views()
    g = grad(isoloss.loss_cos(z1, z2), z1)
    torch.testing.assert_close((g * z1).sum(1), torch.zeros(B, dtype=DT))


@pytest.mark.parametrize("name,fn", [(n, f) for n, f in ALL_LOSSES if not n.startswith("iso")])
def test_gradcheck_float64(setting, name, fn):
    z1, z2, W_P, W_P_half = setting
    assert torch.autograd.gradcheck(lambda a: fn(a, z2.detach(), W_P, W_P_half), (z1,))


def finite_difference(f, x, h=1e-6):
    """Central differences of the scalar f at x, one coordinate at a time."""
    g = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        g.view(-1)[i] = (f(x + e.view_as(x)) - f(x - e.view_as(x))) / (2 * h)
    return g


@pytest.mark.parametrize("iso,base", [("loss_iso_euc", "loss_euc"), ("loss_iso_cos", "loss_cos")])
def test_isoloss_gradient_against_finite_differences_of_the_base_loss(setting, iso, base):
    """The IsoLoss gradient is not the derivative of its own value (gradcheck must fail on it, by
    design); it is the numerical derivative of the base loss in the prediction p = W_P z1."""
    z1, z2, W_P, W_P_half = setting
    p = (z1 @ W_P.T).detach()
    numerical = finite_difference(lambda q: getattr(isoloss, base)(q, z2.detach()), p)
    args = (W_P,) if iso == "loss_iso_euc" else (W_P, W_P_half)
    torch.testing.assert_close(grad(getattr(isoloss, iso)(z1, z2, *args), z1), numerical)
    assert not torch.autograd.gradcheck(lambda a: getattr(isoloss, iso)(a, z2.detach(), *args), (z1,),
                                        raise_exception=False)


@pytest.mark.parametrize("fn", [isoloss.loss_euc, isoloss.loss_cos])
def test_gradcheck_without_stop_grad(setting, fn):
    z1, z2, W_P, _ = setting
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, W_P, stop_grad=False), (z1, z2))


# ---------------------------------------------------------------- Robustness: zero rows, half precision

@pytest.mark.parametrize("name,fn", ALL_LOSSES)
def test_zero_rows_are_finite(setting, name, fn):
    z1, z2, W_P, W_P_half = setting
    z1 = z1.detach().clone()
    z2 = z2.detach().clone()
    z1[0] = 0
    z2[1] = 0
    z1.requires_grad_()
    loss = fn(z1, z2, W_P, W_P_half)
    g = grad(loss, z1)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    if "cos" in name:                      # a zero row has no direction: no gradient from it
        assert g[0].abs().max() == 0 and g[1].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,fn", ALL_LOSSES)
def test_half_precision_inputs_are_finite_and_close(setting, name, fn, dtype):
    z1, z2, W_P, W_P_half = setting
    a = (z1.detach() * 100).to(dtype).requires_grad_()             # |z|^2 ~ 5e4: near fp16's limit
    b = (z2.detach() * 100).to(dtype)
    W, Wh = W_P.float(), W_P_half.float()
    loss = fn(a, b, W, Wh)
    g = grad(loss, a)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and g.dtype == dtype
    ref = fn(a.detach().double(), b.double(), W_P, W_P_half)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- Leading dimensions: independent problems

def test_stacked_problems_equal_a_loop_over_them():
    """z (S, B, M), W_P (S, M, M) -> S losses; C (S, M, M) -> S predictors: as one call per problem."""
    Cs = torch.stack([rand_C(seed=s)[0] for s in range(3)])
    W_P, W_P_half = isoloss.predictor(Cs, 0.5, 0.1)
    for s in range(3):
        expected = isoloss.predictor(Cs[s], 0.5, 0.1)
        torch.testing.assert_close(W_P[s], expected[0])
        torch.testing.assert_close(W_P_half[s], expected[1])
    z1 = torch.randn(3, B, M, dtype=DT, requires_grad=True)
    z2 = torch.randn(3, B, M, dtype=DT)
    for name, fn in ALL_LOSSES:
        stacked = fn(z1, z2, W_P, W_P_half)
        assert stacked.shape == (3,)
        (g,) = torch.autograd.grad(stacked.sum(), z1)
        for s in range(3):
            one = fn(z1[s], z2[s], W_P[s], W_P_half[s])
            torch.testing.assert_close(stacked[s], one)
            torch.testing.assert_close(g[s], grad(one, z1)[s])
    torch.testing.assert_close(isoloss.correlation(z1)[1], isoloss.correlation(z1[1]))


# ---------------------------------------------------------------- The stateful wrapper

def test_closed_form_predictor_module():
    m = isoloss.ClosedFormPredictor(M, alpha=1.0, eps=0.25, tau=0.9)
    assert "C" in m.state_dict() and m.C.dtype == torch.float32
    z1, z2 = torch.randn(8, M), torch.randn(8, M)
    m.update(z1, z2)
    expected_C = isoloss.ema_update(torch.zeros(M, M), torch.cat([z1, z2]), 0.9 ** 2)
    torch.testing.assert_close(m.C, expected_C)
    torch.testing.assert_close(m()[0], isoloss.predictor(expected_C, 1.0, 0.25)[0])
    assert m.to(torch.float64).C.dtype == torch.float64


def test_closed_form_predictor_reduce_averages_batch_estimates():
    """Two processes that average their updated C (an all-reduce mean) hold the C of the whole batch:
    C <- tau C + (1 - tau) sum_i z_i z_i^T / 8 over both processes' 4 samples, a naive loop in float64."""
    procs = [isoloss.ClosedFormPredictor(M, tau=0.5) for _ in range(2)]
    expected = torch.zeros(M, M, dtype=DT)
    for step in range(3):
        batches = [torch.randn(4, M) for _ in procs]
        local = []                                                 # each process's own update, before the reduce
        for p, b in zip(procs, batches):
            q = isoloss.ClosedFormPredictor(M, tau=0.5)
            q.C.copy_(p.C)
            q.update(b)
            local.append(q.C.clone())
        for p, b in zip(procs, batches):
            p.update(b, reduce=lambda C: sum(local) / len(local))     # stands in for dist.all_reduce / world
        outer = sum(torch.outer(z, z) for z in torch.cat(batches).double()) / 8
        expected = 0.5 * expected + 0.5 * outer
        for p in procs:
            torch.testing.assert_close(p.C.double(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- The README snippet runs

def test_readme_snippets_run():
    """The training step with the closed-form predictor, then the straight-through one with a distance of
    one's own, in one namespace (the second reuses the first's network, targets and W_P)."""
    text = Path(__file__).with_name("README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "isoloss" in b and "backward" in b]
    assert len(blocks) == 2 and "straight_through" in blocks[1]
    scope = {}
    for snippet in blocks:
        exec(compile(snippet, "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["loss"] > 0
