"""Closed-form linear predictors and the losses of Table 1 of

    Halvagal, Laborieux & Zenke, "Implicit variance regularization in
    non-contrastive SSL", NeurIPS 2023.

Pure functions, torch only: paste this file into any BYOL/SimSiam code base.

What the methods are
--------------------
BYOL/SimSiam pull a prediction ``W_P z1`` of one view towards the other view's
embedding ``z2`` under a stop-gradient (SG). DirectPred (Tian et al. 2021) does
not train the linear predictor ``W_P``: it sets it in closed form from the
correlation of the embeddings, ``W_P = U D_C^alpha U^T`` (Eq. 1), with
``alpha = 0.5``; DirectCopy uses ``alpha = 1``. In the eigenbasis of ``W_P``
the predictor's eigenvalues ``lambda_m`` multiply each mode's learning rate
(Eqs. 9, 11), so small modes learn slowly. IsoLoss (Eqs. 15, 17) moves the
stop-gradients so that this factor disappears: the predictor is used in the
forward pass and skipped in the backward pass, i.e. the gradient with respect
to ``z1`` is the base loss's gradient with respect to the prediction ``p``.

Paper symbol -> code name (rows of every ``z`` are samples, so ``W_P z`` is
``z @ W_P.T``; any leading dimensions are independent problems, e.g. ``z``
(S, B, M) with ``W_P`` (S, M, M) gives S losses, and ``C`` (S, M, M) gives S
predictors)::

    z^(1), z^(2)      z1, z2       (B, M) online view, target view
    C_z = E[z z^T]    C            (M, M) uncentred correlation, Sec. 2.1
    tau               tau          EMA factor of C (DirectPred: 0.998)
    U, D, lambda_m    U, lambda_   eigenvectors / eigenvalues of W_P
    alpha             alpha        exponent of Eq. 1
    W_P, W_P^{1/2}    W_P, W_P_half
    SG(x)             x.detach()

All losses use the paper's constants (the 1/2 of the Euclidean distance, the
minus sign of the cosine distance) and average over the batch; a training
script chooses any overall scale (BYOL's ``2 - 2 cos`` is ``2 * loss_cos + 2``).
"""
import functools

import torch

__all__ = ["correlation", "ema_update", "predictor", "loss_euc", "loss_cos",
           "loss_iso_euc", "loss_iso_cos", "straight_through", "ClosedFormPredictor"]


def _float32(fn):
    """Run ``fn`` in at least float32 with autocast off (fp16/bf16 in -> fp32 math).

    Inputs in float16/bfloat16 are cast up; the gradient flows back through the
    cast, so it reaches the caller in the caller's dtype.
    """
    def up(t):
        return t.float() if torch.is_tensor(t) and t.dtype in (torch.float16, torch.bfloat16) else t

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device for a in (*args, *kwargs.values()) if torch.is_tensor(a))
        args, kwargs = [up(a) for a in args], {k: up(v) for k, v in kwargs.items()}
        if not torch.is_autocast_enabled(device.type):
            return fn(*args, **kwargs)
        with torch.autocast(device.type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


# ----------------------------------------------------------------------------
# Closed-form predictor (Sec. 2.1, Eq. 1)
# ----------------------------------------------------------------------------

@_float32
def correlation(z):
    """Batch estimate ``z^T z / B`` of ``C_z = E[z z^T]`` (Sec. 2.1, under Eq. 1).

    z: (B, M), detached here. Returns C_batch: (M, M) in at least float32.
    Uncentred, on the raw (not normalised) embeddings. Dividing ``z`` by
    ``sqrt(B)`` before the product follows the reference code (it keeps the
    products small, so no overflow even if a caller multiplies in fp16).
    """
    z = z.detach() / z.shape[-2] ** 0.5    # (B, M)
    return z.mT @ z                        # (M, M)


def ema_update(C, z, tau):
    """``tau * C + (1 - tau) * correlation(z)``: the running estimate of C_z (Sec. 2.1, App. D).

    C: (M, M); z: (B, M). Pure: returns a new tensor, ``C`` is untouched.
    DirectPred uses ``tau = 0.998`` (App. D); the no-EMA-target runs use 0.5.
    """
    return tau * C + (1 - tau) * correlation(z)


def _eigh(C):
    """``torch.linalg.eigh(C)``; if it raises or returns non-finite values, retried in float64 on the CPU.

    float32 fails for some finite matrices: cuSOLVER may not converge on an ill-conditioned ``C``
    (seen under AMP on CUDA), and an eigenvalue beyond float32's range (~3.4e38) comes back as inf.
    Both are fine in float64; the predictor normalises ``s / max(s)`` before anything is cast back.
    The retry raises ``torch.linalg.LinAlgError`` if float64 fails too (e.g. a ``C`` holding NaN).
    On CUDA ``eigh`` synchronises with the CPU anyway (torch docs), so the check adds no wait.
    """
    try:
        s, U = torch.linalg.eigh(C)                  # (..., M), (..., M, M)
        if torch.isfinite(s).all() and torch.isfinite(U).all():
            return s, U
    except torch.linalg.LinAlgError:
        pass
    s, U = torch.linalg.eigh(C.detach().double().cpu())
    if not (torch.isfinite(s).all() and torch.isfinite(U).all()):
        raise torch.linalg.LinAlgError("linalg.eigh: non-finite result in float64 (is C finite?)")
    return s.to(C.device), U.to(C.device)


@_float32
@torch.no_grad()
def predictor(C, alpha=0.5, eps=0.0, normalize=True):
    """Closed-form predictor ``W_P = U D^alpha U^T`` of Eq. 1 and its square root.

    C: (M, M) symmetric correlation (e.g. from ``ema_update``).
    Returns ``(W_P, W_P_half)``, both (M, M), symmetric, without gradient:
    ``W_P = U diag(lambda_) U^T`` and ``W_P_half = U diag(sqrt(lambda_)) U^T``
    (the ``W_P^{1/2}`` of Eq. 17), where, with ``C = U diag(s) U^T``::

        s = clamp(s, 0);  s = s / max(s)  (if normalize);  lambda_ = (s + eps) ** alpha

    DirectPred: ``alpha=0.5, eps=0``; DirectCopy: ``alpha=1, eps=0.25``
    (reference code of the paper). ``normalize=False`` is the plain Eq. 1:
    ``predictor(C, 1.0, normalize=False)`` returns ``C`` for a PSD ``C``.
    An all-zero ``C`` gives ``W_P = eps ** alpha * I`` (finite, no NaN).
    ``torch.linalg.eigh`` replaces the reference code's general ``eig``:
    ``C`` is symmetric, and ``eigh`` is faster and returns real, orthonormal U.
    Where ``eigh`` fails in float32 for a finite ``C``, it is retried in float64
    on the CPU (``_eigh``); ``W_P`` is then built in float64 and returned in
    ``C``'s dtype.
    """
    s, U = _eigh(C)                                  # (M,), (M, M)
    s = s.clamp(min=0)
    if normalize:
        s = s / s.amax(-1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)
    lambda_ = (s + eps) ** alpha                     # (M,) eigenvalues of W_P
    W_P = (U * lambda_[..., None, :]) @ U.mT         # U diag(lambda_) U^T
    W_P_half = (U * lambda_.sqrt()[..., None, :]) @ U.mT
    return W_P.to(C.dtype), W_P_half.to(C.dtype)      # float64 only after a retry in _eigh


# ----------------------------------------------------------------------------
# Losses of Table 1 (Lemma 1, Eqs. 3, 4, 12-15, 17)
# ----------------------------------------------------------------------------

def _inverse(x):
    """1 / x elementwise, and 0 where x == 0 (a zero embedding has no direction)."""
    nonzero = x != 0
    return torch.where(nonzero, 1 / torch.where(nonzero, x, 1), 0)


def _predict(z1, W_P):
    """The prediction ``p = W_P z1`` (row-wise: ``z1 @ W_P.T``); ``W_P=None`` means no predictor."""
    return z1 if W_P is None else z1 @ W_P.mT       # (B, M)


@_float32
def loss_euc(z1, z2, W_P=None, stop_grad=True):
    """Euclidean loss ``1/2 ||W_P z1 - SG(z2)||^2`` (Sec. 2.1; eigenspace form Eq. 3).

    z1, z2: (B, M); W_P: (M, M) or None. Summed over M, averaged over B.
    ``W_P=None``: no predictor, Eq. 13. ``stop_grad=False``: no stop-gradient,
    Eq. 12 (the gradient then also reaches ``z2``).
    """
    p = _predict(z1, W_P)                            # (B, M)
    target = z2.detach() if stop_grad else z2        # (B, M)
    return 0.5 * (p - target).pow(2).sum(-1).mean(-1)


@_float32
def loss_cos(z1, z2, W_P=None, stop_grad=True):
    """Cosine loss ``-cos(W_P z1, SG(z2))`` (Sec. 2.1; eigenspace form Eq. 4), batch mean.

    z1, z2: (B, M); W_P: (M, M) or None. ``W_P=None``: no predictor, Eq. 14.
    ``stop_grad=False``: no stop-gradient (App. C.2). A zero row of either
    input has no direction: it contributes 0 to the loss and no gradient.
    """
    p = _predict(z1, W_P)                            # (B, M)
    target = z2.detach() if stop_grad else z2        # (B, M)
    cos = (p * target).sum(-1) * _inverse(p.norm(dim=-1) * target.norm(dim=-1))  # (B,)
    return -cos.mean(-1)


@_float32
def loss_iso_euc(z1, z2, W_P):
    """Euclidean IsoLoss ``1/2 ||z1 - SG(z2 + z1 - W_P z1)||^2``, Eq. 15 (App. C.5.1).

    z1, z2: (B, M); W_P: (M, M). Same value as ``loss_euc(z1, z2, W_P)``, but
    ``dL/dz1 = W_P z1 - z2`` (per sample, before the batch mean): the gradient of
    the Euclidean loss with respect to the prediction, without the chain-rule
    factor ``W_P`` that makes eigenvalues multiply learning rates (Eq. 16).
    """
    target = (z2 + z1 - _predict(z1, W_P)).detach()  # (B, M)
    return 0.5 * (z1 - target).pow(2).sum(-1).mean(-1)


@_float32
def loss_iso_cos(z1, z2, W_P, W_P_half):
    """Cosine IsoLoss, Eq. 17 (App. C.5.2), batch mean::

        -z1^T SG(z2 / (|W_P z1| |z2|)) + 1/2 SG((W_P z1)^T z2 / (|W_P z1|^3 |z2|)) |W_P^{1/2} z1|^2

    z1, z2: (B, M); W_P, W_P_half: (M, M) from ``predictor``. Its gradient with
    respect to ``z1`` is ``dL_cos/dp`` at ``p = W_P z1`` (it needs
    ``W_P_half @ W_P_half == W_P``); its value differs from ``loss_cos``.
    Zero rows contribute 0 and no gradient, as in ``loss_cos``.
    """
    p = _predict(z1, W_P)                            # (B, M) prediction
    q = _predict(z1, W_P_half)                       # (B, M) W_P^{1/2} z1
    with torch.no_grad():                            # the two SG(...) factors
        p_norm, z2_norm = p.norm(dim=-1), z2.norm(dim=-1)                   # (B,)
        a = z2 * _inverse(p_norm * z2_norm)[..., None]                      # (B, M)
        b = (p * z2).sum(-1) * _inverse(p_norm ** 3 * z2_norm)              # (B,)
    return (-(z1 * a).sum(-1) + 0.5 * b * q.pow(2).sum(-1)).mean(-1)


# ----------------------------------------------------------------------------
# IsoLoss as a straight-through predictor: any distance (Eqs. 8, 10, 15-17)
# ----------------------------------------------------------------------------

class _StraightThrough(torch.autograd.Function):
    """Forward ``p = z1 W_P^T``; backward ``dL/dz1 = dL/dp`` (``W_P`` skipped)."""

    @staticmethod
    def forward(ctx, z1, W_P):
        return z1 @ W_P.mT                           # (B, M)

    @staticmethod
    def backward(ctx, grad_p):
        return grad_p, None


@_float32
def straight_through(z1, W_P):
    """The prediction ``p = W_P z1`` in the forward pass, the identity in the backward pass.

    z1: (B, M); W_P: (M, M). Returns p: (B, M) with the value of ``z1 @ W_P.T`` and
    ``dL/dz1 = dL/dp``. For any distance ``L(p, SG(z2))`` this is IsoLoss:

    - The chain rule through ``p = W_P z1`` gives ``dL/dz1 = W_P^T dL/dp``. In the eigenbasis
      of ``W_P`` each mode's gradient is multiplied by its eigenvalue ``lambda_m`` (the
      leading ``lambda_m`` of Eqs. 8 and 10), so the eigenvalues set the modes' learning rates.
    - Skipping ``W_P`` in the backward pass removes that factor: Eqs. 8 and 10 without the
      leading ``lambda_m``. That is what the IsoLosses do by moving the stop-gradients:
      Eq. 15's ``dL/dz1 = W_P z1 - z2`` is ``dL_euc/dp``, and Eq. 17's gradient is ``dL_cos/dp``
      (App. C.5). So ``loss_euc(straight_through(z1, W_P), z2)`` has the gradient of
      ``loss_iso_euc(z1, z2, W_P)`` and ``loss_cos(straight_through(z1, W_P), z2)`` that of
      ``loss_iso_cos``, while their values are those of ``loss_euc`` and ``loss_cos``.
    - It needs no ``W_P^{1/2}`` and works for any distance, e.g. a smooth L1.
    """
    return _StraightThrough.apply(z1, W_P)


# ----------------------------------------------------------------------------
# Optional stateful wrapper for drop-in use
# ----------------------------------------------------------------------------

class ClosedFormPredictor(torch.nn.Module):
    """Keeps ``C`` as a buffer (moves with ``.to()``, saved in ``state_dict``) and
    builds ``(W_P, W_P_half)`` from it with ``predictor`` (Eq. 1).

    ``update(*zs)`` folds the batches ``zs`` (each (B, M), e.g. both views) into
    C in one EMA step with factor ``tau ** len(zs)``: the same time constant as
    one update per view (the reference code's way), one eigendecomposition.
    ``reduce`` (optional) is applied to the updated C, e.g. an all-reduce mean
    across processes: averaging EMA states that started equal averages the
    batch estimates, so this library never needs ``torch.distributed``.
    """

    def __init__(self, dim, alpha=0.5, eps=0.0, tau=0.998):
        super().__init__()
        self.alpha, self.eps, self.tau = alpha, eps, tau
        self.register_buffer("C", torch.zeros(dim, dim))   # (M, M), float32

    @torch.no_grad()
    def update(self, *zs, reduce=None):
        C = ema_update(self.C, torch.cat(zs), self.tau ** len(zs))
        self.C.copy_(C if reduce is None else reduce(C))

    def forward(self):
        return predictor(self.C, self.alpha, self.eps)
