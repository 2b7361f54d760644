"""Linear-network experiments of Sec. 3: Figs. 2, 5, 6 and every row of Table 1,
with the theory's predictions drawn beside the simulation.

    python toy.py [--updates exact|paper|both] [--only fig2|fig5|fig6] [--out DIR] [--quick] [--bench]
    python toy.py --help            # what each option does

A linear Siamese network ``z = W x`` (``embed``; a ReLU on ``z`` for Fig. 6) is trained with
each loss of Table 1 (``LOSSES``) by plain gradient steps on fresh Gaussian views, with the
closed-form predictor ``W_P = (W W^T)^alpha`` of ``isoloss.predictor`` (``simulate``). The default
update is the exact gradient, autograd through the same ``isoloss`` functions as train.py; the
paper mode applies the notebook's rules (``paper_update``). Dashed in the figures: Eqs. 9, 12, 13
and 16 (``RATE``, ``theory``). Plotted: the eigenvalues of ``W W^T``.

README.md ("The toy") gives the setup, the run times, how the toy is made fast, the departures
from the notebook, and where the paper's rules and the exact gradient differ, with the numbers.
"""
import argparse
import contextlib
import ctypes
import functools
import json
import math
import multiprocessing
import os
import queue
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

import isoloss

SETTINGS = ("euc", "euc_nosg", "euc_nopred", "iso_euc", "cos", "cos_nosg", "cos_nopred", "iso_cos")

LOSSES = {  # Table 1 row -> loss(z1, z2, W_P, W_P_half) from the library
    "euc": lambda z1, z2, W, Wh: isoloss.loss_euc(z1, z2, W),                           # Eq. 3
    "euc_nosg": lambda z1, z2, W, Wh: isoloss.loss_euc(z1, z2, W, stop_grad=False),     # Eq. 12
    "euc_nopred": lambda z1, z2, W, Wh: isoloss.loss_euc(z1, z2),                       # Eq. 13
    "iso_euc": lambda z1, z2, W, Wh: isoloss.loss_iso_euc(z1, z2, W),                   # Eq. 15
    "cos": lambda z1, z2, W, Wh: isoloss.loss_cos(z1, z2, W),                           # Eq. 4
    "cos_nosg": lambda z1, z2, W, Wh: isoloss.loss_cos(z1, z2, W, stop_grad=False),     # App. C.2
    "cos_nopred": lambda z1, z2, W, Wh: isoloss.loss_cos(z1, z2),                       # Eq. 14
    "iso_cos": lambda z1, z2, W, Wh: isoloss.loss_iso_cos(z1, z2, W, Wh),               # Eq. 17
}

# Learning rates of the paper's notebook: 0.01 for the Euclidean rows with a
# predictor, 0.1 for the Euclidean no-predictor row and all cosine rows.
LR = {s: 0.01 if s in ("euc", "euc_nosg", "iso_euc") else 0.1 for s in SETTINGS}

# g(lambda) of dz_m/dt = eta g(lambda_m) z_m, exact for the expected update of the linear Euclidean rows, so
# an eigenvalue s of W W^T (lambda = s ** alpha, that of W_P) obeys ds/dt = 2 eta g(lambda) s. Eq. 12 assumes
# E[z2 z2^T] = E[z1 z2^T]; here view 2 carries the noise, E[x2 x2^T] = (1 + sigma^2) I, and the expected
# update is dW = -eta ((W_P - I)^2 + sigma^2 I) W, i.e. g = -((1 - lambda)^2 + sigma^2).
RATE = {
    "euc": lambda lam, sigma: lam * (1 - lam),                                 # Eq. 9
    "euc_nosg": lambda lam, sigma: -((1 - lam) ** 2 + sigma ** 2),             # Eq. 12 + view-2 noise
    "euc_nopred": lambda lam, sigma: 0 * lam,                                  # Eq. 13
    "iso_euc": lambda lam, sigma: 1 - lam,                                     # Eq. 16
}

# Panel order of Fig. 2: (a) no stop-grad, (b) no predictor, (c) BYOL/SimSiam loss, (d) IsoLoss.
PANELS = (("euc_nosg", "euc_nopred", "euc", "iso_euc"), ("cos_nosg", "cos_nopred", "cos", "iso_cos"))

UPDATES = ("exact", "paper")     # autograd through isoloss.py, or the notebook's rules (paper_update)
NORM_EPS = 1e-8                  # the notebook's guard added to |p| and |z2| in its cosine rules with a predictor


def paper_update(setting, W, x1, x2, W_P, relu):
    """The paper's hand-written update of one Table 1 row: ``Delta W / eta`` on a batch, (M, N).

    The notebook's rules, which made the published Figs. 2, 5 and 6 (``--updates paper``).
    x1, x2: (B, N) views (rows are samples; the code works on their columns, as the paper
    writes them); W: (M, N); W_P: (M, M) = (W W^T)^alpha without gradient, or None.
    With z = phi(W x) (phi the identity, or the ReLU of Fig. 6), p = W_P z1,
    phi' = 1[W x1 > 0] in every term (view 1's, also in view-2 terms), e = (p - z2) * phi',
    per sample, then summed over the batch and divided by B::

        euc         -W_P^T e x1^T                      Eq. 3's gradient with phi' before W_P^T
        euc_nosg    -(-e x2^T + W_P^T e x1^T)          Eq. 12's, the same and view 1's phi'
        euc_nopred  -(z1 - z2) x1^T                    Eq. 13's without phi'
        iso_euc     -e x1^T                            Eq. 15's
        cos*        [W_P z2 / (|p||z2|) - (p.z2) W_P p / (|p|^3 |z2|)] * phi' x1^T      Eq. 4's
        iso_cos*    [z2 / (|p||z2|) - (p.z2) p / (|p|^3 |z2|)] * phi' x1^T              Eq. 17's
        cos_nosg*   [W_P (z1 + z2) / (|p||z2|) - (p.z2)(W_P p + z2) / (|p|^3 |z2|)] * phi' x1^T
        cos_nopred  [z2 / (|z1||z2|) - (z1.z2) z1 / (|z1|^3 |z2|)] * phi' x1^T          Eq. 14's

    ``*``: the norms |p| and |z2| carry + ``NORM_EPS``. ``cos_nosg`` is not the gradient of
    its loss (App. C.2): the exact step's target-branch term is ``[p / (|p||z2|) - (p.z2) z2 /
    (|p||z2|^3)] * phi'(W x2) x2^T``; the rule has x1 and |p|^3 |z2| there (App. C.2's
    derivation has the same prefactor). The caller applies
    ``W <- W + nan_to_num(eta * Delta W)`` (``simulate``): a non-finite entry becomes 0.
    Linear: equal to the exact gradient step for every row but ``cos_nosg`` (the 1e-8 aside).
    """
    X1, X2 = x1.T, x2.T                                        # (N, B): columns are samples, as in the paper
    A1 = W @ X1                                                # (M, B) W x1 (here ~20x faster than x1 @ W.T)
    Z1, Z2 = (A1.relu(), (W @ X2).relu()) if relu else (A1, W @ X2)             # (M, B)
    D = (A1 > 0).to(W.dtype) if relu else torch.ones_like(A1)  # (M, B) phi'(W x1)

    def norm(Z):                                               # (B,) column norms (here ~10x faster than .norm(dim=0))
        return (Z * Z).sum(0).sqrt()

    if setting in ("euc", "euc_nosg", "iso_euc"):
        E = (W_P @ Z1 - Z2) * D                                # (M, B) e = (p - z2) * phi'
        delta = {"euc": lambda: -(W_P.T @ E) @ x1,             # (M, N): -W_P^T e x1^T summed over the batch
                 "euc_nosg": lambda: E @ x2 - (W_P.T @ E) @ x1,
                 "iso_euc": lambda: -E @ x1}[setting]()
    elif setting == "euc_nopred":
        delta = -(Z1 - Z2) @ x1
    elif setting == "cos_nopred":
        n1, n2 = norm(Z1), norm(Z2)                            # (B,), no guard
        U = Z2 / (n1 * n2) - (Z1 * Z2).sum(0) * Z1 / (n1 ** 3 * n2)                # (M, B)
        delta = (U * D) @ x1
    else:                                                      # cos, iso_cos, cos_nosg
        P = W_P @ Z1                                           # (M, B) p
        n_p, n2 = norm(P) + NORM_EPS, norm(Z2) + NORM_EPS      # (B,)
        pz = (P * Z2).sum(0)                                   # (B,) p . z2
        U = {"cos": lambda: W_P @ Z2 / (n_p * n2) - pz * (W_P @ P) / (n_p ** 3 * n2),
             "iso_cos": lambda: Z2 / (n_p * n2) - pz * P / (n_p ** 3 * n2),
             "cos_nosg": lambda: W_P @ (Z1 + Z2) / (n_p * n2) - pz * (W_P @ P + Z2) / (n_p ** 3 * n2),
             }[setting]()                                      # (M, B)
        delta = (U * D) @ x1
    return delta / x1.shape[0]                                 # (M, N)


def skips_steps(setting, relu, updates):
    """Whether one sample can zero a whole step's update: the paper's cosine no-predictor rule
    (no 1e-8 guard) with a ReLU, where an all-zero z1 or z2 makes every entry non-finite. Such an
    update is no batch mean of per-sample terms: reduced or antithetic samples would bias it."""
    return updates == "paper" and relu and setting == "cos_nopred"


DEFAULTS = dict(
    seed=2,             # torch.manual_seed(2) then W0 = randn(M, N) / 4: the notebook's initial condition
    samples=50_000,     # fresh samples per step (notebook)
    steps=1_500,        # steps per setting (notebook)
    nopred_steps=100_000,  # steps of the two no-predictor settings (notebook)
    nopred_samples=512,    # antithetic samples per step of the sample-based 100,000-step panels (draw_views;
                           # README.md: how they compare with 50,000)
    sigma=0.1,          # std of view 2's perturbation (Sec. 3)
    alpha=1.0,          # W_P = (W W^T)^alpha (notebook)
    N=15, M=10,         # eigenvalue panels, Figs. 2 and 6 (Sec. 3)
    traj_N=6, traj_M=2,  # trajectory panels and Fig. 5
    traj_lr=0.01,       # every setting of the trajectory panels and Fig. 5 (notebook)
    traj_inputs=5_000, traj_shown=20,  # the 20 highest-norm of 5,000 fixed inputs are drawn (notebook)
    points=500,         # recorded points per run (at least 200)
)
QUICK = dict(samples=2_000, steps=200, nopred_steps=2_000, nopred_samples=128, points=200)


# ----------------------------------------------------------------------------
# Samples: fresh views, or an exact moment batch
# ----------------------------------------------------------------------------

def draw_views(n, N, sigma, randn, antithetic=False):
    """``n`` fresh samples of the two views: x1 = x, x2 = x + sigma * eps. Each (n, N).
    ``randn(*shape)``: standard normals (``torch.randn`` with the job's generator, or ``Normals.randn``).

    ``antithetic``: n/2 fresh inputs x, each seen with the two views x +- sigma * eps. Every
    sample is still exactly distributed and the update an unbiased estimate of the same expected
    update, but the view noise, which dominates the no-predictor updates, cancels to first order.
    """
    if antithetic:
        x = randn(n // 2, N)
        eps = sigma * randn(n // 2, N)
        return torch.cat([x, x]), torch.cat([x + eps, x - eps])
    x1 = randn(n, N)
    return x1, x1 + sigma * randn(n, N)


class Normals:
    """The standard normals of ``torch.randn(..., generator=generator)``, drawn ahead in blocks by a
    background thread: a second core draws them while this one computes (torch releases the GIL).

    torch's CPU sampler turns each 16 consecutive draws of the generator into 16 normals, so for
    sizes that are multiples of 16 the values do not depend on how the stream is cut into calls:
    ``randn(*shape)`` returns what ``torch.randn(*shape, generator=generator)`` would have
    (``test_toy.py`` checks it); other sizes give the stream's next values, still exact normals.
    Blocks of ``block`` normals (2^20: two thirds of a 50,000-sample step's), ``ahead`` of them waiting.
    """

    def __init__(self, generator, block=2 ** 20, ahead=2):
        self.blocks, self.stop = queue.Queue(ahead), threading.Event()
        self.block, self.used = torch.empty(0), 0
        self.thread = threading.Thread(target=self.draw, args=(generator, block), daemon=True)
        self.thread.start()

    def draw(self, generator, block):
        while not self.stop.is_set():
            x = torch.randn(block, generator=generator)
            while not self.stop.is_set():
                try:
                    self.blocks.put(x, timeout=0.1)
                    break
                except queue.Full:
                    pass

    def randn(self, *shape):
        n, parts = math.prod(shape), []
        while n:
            if self.used == len(self.block):
                self.block, self.used = self.blocks.get(), 0
            k = min(n, len(self.block) - self.used)
            parts.append(self.block[self.used:self.used + k])
            self.used, n = self.used + k, n - k
        return (torch.cat(parts) if len(parts) > 1 else parts[0]).view(shape)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def draw_moment_batch(n, N, sigma):
    """A pseudo-batch of 2N rows with the exact distribution of the second moments of ``n`` views.

    The stacked views ``y = A w``, ``w ~ N(0, I_2N)``, ``A = [[I, 0], [I, sigma I]]``, so the
    scatter of n samples is ``A T T^T A^T`` with ``T T^T ~ Wishart(I_2N, n)``. Bartlett:
    ``T`` is lower triangular with ``T_ii^2 ~ chi^2(n - i)`` and ``T_ij ~ N(0, 1)`` below the
    diagonal. The 2N rows of ``sqrt(2N / n) (A T)^T`` have mean outer product ``scatter / n``,
    so any loss that is a batch mean of quadratic forms in ``(x1, x2)`` takes the value (and
    gradient) it would take on those n samples. Returns (x1, x2), each (2N, N), in float64:
    costless at this size, and it resolves the no-stop-grad row's decay to 1e-15 (float32 cannot).
    """
    d = 2 * N
    T = torch.randn(d, d, dtype=torch.float64).tril_(-1)
    # chi^2(k) = 2 Gamma(k / 2): torch.distributions.Chi2 samples it this way, at 5x the per-call cost
    T.diagonal().copy_(torch._standard_gamma((n - torch.arange(d, dtype=torch.float64)) / 2).mul_(2).sqrt_())
    Y = (mixing(N, sigma) @ T).T * math.sqrt(d / n)     # (2N, 2N) pseudo-rows (x1, x2)
    return Y[:, :N], Y[:, N:]


@functools.lru_cache
def mixing(N, sigma):
    """A = [[I, 0], [I, sigma I]]: (x1, x2) = A (x, eps)."""
    I, O = torch.eye(N, dtype=torch.float64), torch.zeros(N, N, dtype=torch.float64)
    return torch.cat([torch.cat([I, O], 1), torch.cat([I, sigma * I], 1)])


# ----------------------------------------------------------------------------
# Simulation
# ----------------------------------------------------------------------------

@dataclass
class Run:
    """One trained network: a Table 1 row with an initial W0 (M, N)."""
    setting: str
    W0: torch.Tensor
    lr: float
    relu: bool = False                   # ReLU on the embeddings (Fig. 6)
    long: bool = False                   # a no-predictor panel: --nopred-steps, --nopred-samples
    exact_moments: bool = True           # allow moment batches (False: always real samples)
    fixed: torch.Tensor = None           # (K, N) inputs whose embeddings are recorded (Figs. 2, 6 top)
    updates: str = "exact"               # "exact": autograd; "paper": the notebook's rule (paper_update)
    out: dict = field(default_factory=dict)

    @property
    def moments(self):                   # linear Euclidean rows: exact moment batches (both modes)
        return self.exact_moments and not self.relu and self.setting in RATE

    @property
    def reducible(self):                 # its update may be estimated from fewer, antithetic samples
        return not skips_steps(self.setting, self.relu, self.updates)


def eigenvalues(W):
    """Sorted eigenvalues of W W^T, as squared singular values of W (non-negative, accurate when tiny)."""
    return torch.linalg.svdvals(W).flip(-1) ** 2


def embed(x, W, relu):
    """z = W x for rows of x (B, N) -> (B, M), with an optional ReLU (Fig. 6)."""
    z = (W @ x.T).T.contiguous()         # = x @ W.T; this order runs the 50,000-sample jobs 15-20% faster here (MKL)
    return z.relu() if relu else z


def view_chunks(samples, N, sigma, randn, antithetic=False, chunk=None):
    """One step's fresh views, all at once (``chunk`` None) or in chunks of ``chunk``, 2 ``chunk``,
    4 ``chunk``, ... samples (the last one smaller), each with its weight ``n / samples`` (its
    batch mean's share of the step's). Doubling keeps the chunks few when all are needed."""
    if chunk is None:
        yield draw_views(samples, N, sigma, randn, antithetic), 1.0
        return
    assert not antithetic, "antithetic pairs are drawn whole batches at a time"
    start = 0
    while start < samples:
        n = min(chunk, samples - start)
        yield draw_views(n, N, sigma, randn), n / samples
        start, chunk = start + n, 2 * chunk


def simulate(runs, steps, samples, seed=0, antithetic=False, moment_samples=DEFAULTS["samples"],
             sigma=DEFAULTS["sigma"], alpha=DEFAULTS["alpha"], points=DEFAULTS["points"], chunk=None):
    """Train ``runs`` side by side for ``steps`` plain steps on common random numbers.

    A run steps along its loss's exact gradient (``run.updates == "exact"``: autograd through
    ``isoloss``), or by the paper's rule, ``W <- W + nan_to_num(lr * paper_update(...))`` with
    non-finite entries set to 0 (``"paper"``). Sample-based runs see ``samples`` fresh views per
    step (``draw_views``); moment runs see an exact moment batch of ``moment_samples`` views. The
    two come from separate random streams (``seed``, ``seed + 1``), so no run's samples depend on
    which other runs share the loop. ``chunk``: draw the views in growing chunks (``view_chunks``),
    and stop drawing a step's views once every run they feed is a paper run whose
    summed update is non-finite in every entry: nan_to_num then zeroes it whatever the rest of
    the batch holds (``skips_steps``). Records, at ~``points`` steps, the sorted eigenvalues of
    ``W W^T`` into ``run.out`` (and the embeddings of ``run.fixed``).
    """
    generator = torch.Generator().manual_seed(seed)          # views
    torch.manual_seed(seed + 1)                              # moment batches
    # Drawing a full-sample job's (``chunk``) 50,000 views per step is most of its time: a second core draws them.
    ahead = Normals(generator) if chunk else contextlib.nullcontext()
    randn = ahead.randn if chunk else functools.partial(torch.randn, generator=generator)
    Ws = [r.W0.to(torch.float64 if r.moments else torch.float32, copy=True).requires_grad_(r.updates == "exact")
          for r in runs]
    N = max(r.W0.shape[1] for r in runs)
    on_views = [i for i, r in enumerate(runs) if not r.moments]
    on_moments = [i for i, r in enumerate(runs) if r.moments]
    exact = [i for i, r in enumerate(runs) if r.updates == "exact"]

    def batches():                                           # one step's (views, weight, the runs they feed)
        if on_moments:
            yield draw_moment_batch(moment_samples, N, sigma), 1.0, on_moments
        for views, weight in view_chunks(samples, N, sigma, randn, antithetic, chunk) if on_views else ():
            yield views, weight, on_views

    every = max(1, steps // points)
    for r in runs:
        r.out.update(steps=[], eigenvalues=[], trajectory=[])
    with ahead:
        for t in range(steps + 1):
            if t % every == 0 or t == steps:
                record(runs, Ws, t)
            if t == steps:
                break
            predictors = [(None, None) if "nopred" in r.setting else
                          isoloss.predictor(W.detach() @ W.detach().T, alpha, normalize=False)
                          for r, W in zip(runs, Ws)]
            loss, deltas = 0, [0] * len(runs)
            for (x1, x2), weight, fed in batches():
                for i in fed:
                    r, W, (W_P, W_P_half) = runs[i], Ws[i], predictors[i]
                    x1_, x2_ = x1[:, :W.shape[1]], x2[:, :W.shape[1]]
                    if r.updates == "paper":
                        deltas[i] = deltas[i] + weight * paper_update(r.setting, W, x1_, x2_, W_P, r.relu)
                        continue
                    z1 = embed(x1_, W, r.relu)
                    with torch.set_grad_enabled("nosg" in r.setting):   # the target branch: SG unless nosg
                        z2 = embed(x2_, W, r.relu)
                    term = LOSSES[r.setting](z1, z2, W_P, W_P_half)
                    loss = loss + (term if weight == 1 else weight * term)
                if chunk is not None and fed is on_views and all(
                        runs[i].updates == "paper" and not torch.isfinite(deltas[i]).any() for i in on_views):
                    break                                        # the step is skipped: draw no more views
            grads = dict(zip(exact, torch.autograd.grad(loss, [Ws[i] for i in exact]))) if exact else {}
            with torch.no_grad():
                for i, (r, W) in enumerate(zip(runs, Ws)):
                    if r.updates == "paper":
                        W.add_(torch.nan_to_num(r.lr * deltas[i], nan=0.0, posinf=0.0, neginf=0.0))
                    else:
                        W.sub_(r.lr * grads[i])
    return runs


@torch.no_grad()
def record(runs, Ws, t):
    for r, W in zip(runs, Ws):
        r.out["steps"].append(t)
        r.out["eigenvalues"].append(eigenvalues(W).tolist())
        if r.fixed is not None:
            r.out["trajectory"].append(embed(r.fixed.to(W.dtype), W, r.relu).tolist())


def theory(setting, s0, steps, lr, sigma, alpha):
    """Eigenvalues of W W^T at ``steps`` predicted by Eqs. 9, 12, 13, 16 (None for other rows).

    Each gradient step moves every eigenmode by ``dz_m = lr g(lambda_m) z_m``, i.e. the
    equation with dt = one step: ``s <- s (1 + lr g(s^alpha))^2``. (Integrating the ODE in
    continuous time instead drifts from the discrete simulation by O(lr) per unit of
    ``lr t``: 15% for the no-stop-grad row after 1,500 steps.)
    """
    if setting not in RATE:
        return None
    s, out, wanted = torch.tensor(s0, dtype=torch.float64), [], set(steps)
    for t in range(max(steps) + 1):
        if t in wanted:
            out.append(s.sort().values.tolist())
        s = s * (1 + lr * RATE[setting](s.clamp(min=0) ** alpha, sigma)) ** 2
    return out


def max_deviation(sim, th):
    """Largest relative deviation |sim - theory| / theory over all recorded steps and modes."""
    sim, th = torch.tensor(sim, dtype=torch.float64), torch.tensor(th, dtype=torch.float64)
    return ((sim - th).abs() / th.abs()).max().item()


# ----------------------------------------------------------------------------
# The experiments
# ----------------------------------------------------------------------------

def initial_weights(cfg, M, N):
    """The notebook's initial condition: torch.manual_seed(seed), then W0 = randn(M, N) / 4."""
    torch.manual_seed(cfg["seed"])
    return torch.randn(M, N) / 4


def fig2_runs(cfg, relu=False, updates="exact"):
    """Eigenvalue panels (Fig. 2 bottom; Fig. 6 with ``relu``): one run per Table 1 row."""
    W0 = initial_weights(cfg, cfg["M"], cfg["N"])
    return {s: Run(s, W0, LR[s], relu=relu, long="nopred" in s, updates=updates) for s in SETTINGS}


def trajectory_runs(cfg, relu=False, updates="exact"):
    """Fig. 2 top (Fig. 6 top with ``relu``): M=2, N=6, lr 0.01 for every row, 20 highest-norm
    of 5,000 fixed inputs."""
    torch.manual_seed(cfg["seed"])
    X = torch.randn(cfg["traj_N"], cfg["traj_inputs"]).T                        # (5000, N), notebook's draw
    fixed = X[X.norm(dim=1).argsort(descending=True)[:cfg["traj_shown"]]]       # (20, N)
    W0 = initial_weights(cfg, cfg["traj_M"], cfg["traj_N"])
    return {s: Run(s, W0, cfg["traj_lr"], relu=relu, fixed=fixed, updates=updates) for s in SETTINGS}


def fig5_runs(cfg, trajectories=None, updates="exact"):
    """Fig. 5: M=2, three initialisations (W0, 2 W0, randn / 2), Euclidean vs cosine. The first
    is the trajectory panels' run of the same loss (same W0 and lr): reused when given."""
    W0 = initial_weights(cfg, cfg["traj_M"], cfg["traj_N"])
    inits = [W0, 2 * W0, torch.randn(cfg["traj_M"], cfg["traj_N"]) / 2]
    runs = {loss: [Run(loss, W, cfg["traj_lr"], updates=updates) for W in inits] for loss in ("euc", "cos")}
    for loss in runs if trajectories else ():
        runs[loss][0] = trajectories[loss]
    return runs


def build_runs(cfg, only=None, updates="exact"):
    """The runs of the chosen figures: {figure: {setting: Run}} ({loss: [Run]} for fig5)."""
    figs = {}
    if only in (None, "fig2"):
        figs["fig2"], figs["trajectories"] = fig2_runs(cfg, False, updates), trajectory_runs(cfg, False, updates)
    if only in (None, "fig6"):
        figs["fig6"], figs["fig6_trajectories"] = fig2_runs(cfg, True, updates), trajectory_runs(cfg, True, updates)
    if only in (None, "fig5"):
        figs["fig5"] = fig5_runs(cfg, figs.get("trajectories"), updates)
    return figs


def flatten(runs):
    """The Run objects of one figure's entry ({setting: Run} or {loss: [Run]})."""
    return [r for rs in runs.values() for r in (rs if isinstance(rs, list) else [rs])]


@dataclass
class Job:
    """An independent simulation with its own random streams."""
    name: str
    runs: list
    steps: int
    samples: int
    seed: int
    antithetic: bool = False
    chunk: int = None                    # draw the views in chunks (simulate), skipping what cannot matter

    @property
    def mode(self):                      # the update rule of its runs (a figure's runs share one)
        return self.runs[0].updates


JOBS = (  # name, seed offset, the figures' entries whose runs it simulates, which of their runs. Jobs that
    # share a seed offset see the same samples: splitting one in two only packs the process pool better.
    ("fig2 no-predictor", 10, ("fig2",), lambda r: r.long),
    ("fig6 no-predictor", 20, ("fig6",), lambda r: r.long),
    ("fig2 main", 30, ("fig2",), lambda r: not r.long),
    ("fig6 main, Euclidean", 40, ("fig6",), lambda r: not r.long and r.setting in RATE),
    ("fig6 main, cosine", 40, ("fig6",), lambda r: not r.long and r.setting not in RATE),
    ("M=2 panels", 50, ("trajectories", "fig5"), lambda r: True),
    ("fig6 M=2 panels, Euclidean", 60, ("fig6_trajectories",), lambda r: r.setting in RATE),
    ("fig6 M=2 panels, cosine", 60, ("fig6_trajectories",), lambda r: r.setting not in RATE),
)
FULL = ", full samples"  # suffix of a no-predictor job's runs that may not see reduced samples (Run.reducible)
SECONDS = {  # seconds per job on one of 2 cores (measured in one default run), only to order the jobs: longest first
    "fig2 no-predictor": 94, "fig6 no-predictor": 86, "fig2 main": 96, "fig6 main, Euclidean": 70,
    "fig6 main, cosine": 105, "M=2 panels": 68, "fig6 M=2 panels, Euclidean": 38, "fig6 M=2 panels, cosine": 40,
    "fig6 no-predictor" + FULL: 423,            # in a paper-mode run
}
CHUNK = 2_048  # first chunk of a full-sample no-predictor job (view_chunks, simulate's early exit): small next
               # to the ~15,000 samples between all-zero ReLU outputs at W0 (measured: about 7e-5 of the samples)


PREFIX = {"exact": "", "paper": "paper: "}   # printed before the runs and jobs of each mode
RESULTS = {"exact": "toy_results.json", "paper": "toy_results_paper.json"}   # each mode's results file


def longest_first(jobs):
    """The order the process pool takes the jobs: longest first (``SECONDS``), which packs them well."""
    return sorted(jobs, key=lambda job: -SECONDS.get(job.name, 0))


def build_jobs(cfg, figs):
    """The independent simulations. The 100,000-step no-predictor runs see ``--nopred-samples`` antithetic views
    where that estimates their update without bias (``Run.reducible``), else ``--samples``
    fresh views in chunks. Each job has fixed seeds (the same in both modes, so both see the same
    samples) and always the same input size, so results do not depend on ``--only``, ``--jobs``
    or ``--updates``."""
    jobs = []
    for name, offset, keys, chosen in JOBS:
        runs = list({id(r): r for key in keys if key in figs for r in flatten(figs[key]) if chosen(r)}.values())
        seed = cfg["seed"] + offset
        if runs and not runs[0].long:
            jobs.append(Job(name, runs, cfg["steps"], cfg["samples"], seed))
            continue
        reduced, full = [r for r in runs if r.reducible], [r for r in runs if not r.reducible]
        if reduced:
            jobs.append(Job(name, reduced, cfg["nopred_steps"], cfg["nopred_samples"], seed, antithetic=True))
        if full:
            jobs.append(Job(name + FULL, full, cfg["nopred_steps"], cfg["samples"], seed + 5, chunk=CHUNK))
    return jobs


def run_job(job, cfg):
    """Simulate one job and its theory curves; returns the runs' records and the seconds it took.
    (The paper's linear Euclidean rules are the gradients of their losses: the theory holds in both modes.)"""
    start = time.perf_counter()
    simulate(job.runs, job.steps, job.samples, job.seed, job.antithetic,
             cfg["samples"], cfg["sigma"], cfg["alpha"], cfg["points"], job.chunk)
    for r in job.runs:
        r.out["theory"] = None if r.relu else theory(
            r.setting, r.out["eigenvalues"][0], r.out["steps"], r.lr, cfg["sigma"], cfg["alpha"])
    return [r.out for r in job.runs], time.perf_counter() - start


def keep_freed_memory():
    """Let glibc keep freed memory for reuse. By default it returns freed blocks of a few megabytes to
    the system at once, and the 50,000-sample jobs, which allocate such temporaries several times a
    step, spent a third of their time faulting the same pages back in. Results do not change. Linux
    with glibc only; elsewhere this does nothing."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 2 ** 30)      # M_TRIM_THRESHOLD (malloc.h): keep up to 1 GiB free at the heap's top
        libc.mallopt(-3, 2 ** 25)      # M_MMAP_THRESHOLD: blocks up to 32 MiB (the toy's are a few) from the heap
    except (OSError, AttributeError, TypeError):
        pass


def init_worker():
    torch.set_num_threads(1)
    keep_freed_memory()


def run_jobs(jobs, cfg, workers):
    """Run ``jobs``; ``workers`` > 1: in parallel processes of one thread each (the toy's tensors
    are too small for threads to pay, processes do). Returns [(records, seconds)] per job."""
    if workers == 1:
        keep_freed_memory()
        return [run_job(job, cfg) for job in jobs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), context, init_worker) as pool:
        return list(pool.map(run_job, jobs, [cfg] * len(jobs)))


def run_all(cfg, only=None, workers=1, modes=("exact",)):
    """Simulate the chosen figures with each update rule in ``modes``, all jobs in one pool.
    Returns {mode: figures} (records and theory in ``run.out``) and {mode: {job: seconds}}."""
    figs = {mode: build_runs(cfg, only, mode) for mode in modes}
    jobs = longest_first([job for mode in modes for job in build_jobs(cfg, figs[mode])])
    seconds = {mode: {} for mode in modes}
    for job, (outs, sec) in zip(jobs, run_jobs(jobs, cfg, workers)):
        for r, out in zip(job.runs, outs):
            r.out = out
        seconds[job.mode][job.name] = round(sec, 2)
    return figs, seconds


# ----------------------------------------------------------------------------
# Figures and results
# ----------------------------------------------------------------------------

def plot_eigenvalues(ax, record, title, color=None):
    """One run's eigenvalues (and theory) from its record: ``run.out`` or its entry in the results file."""
    steps, eig = record["steps"], torch.tensor(record["eigenvalues"])
    ax.plot(steps, eig.clamp(min=1e-16).numpy(), lw=1.2, color=color)
    if record["theory"] is not None:
        ax.plot(steps, torch.tensor(record["theory"]).clamp(min=1e-16).numpy(), "k--", lw=0.8)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)


def plot_trajectory(ax, run, title):
    traj = torch.tensor(run.out["trajectory"])                         # (T, K, 2)
    for k in range(traj.shape[1]):
        ax.plot(traj[:, k, 0], traj[:, k, 1], lw=0.8, color=f"C{k % 10}", alpha=0.7)
    ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=12, c=[f"C{k % 10}" for k in range(traj.shape[1])], zorder=3)
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal", adjustable="datalim")


def eigenvalue_figure(runs, path, suptitle):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(13, 5.6), constrained_layout=True)
    for row, settings in zip(axes, PANELS):
        for ax, s in zip(row, settings):
            plot_eigenvalues(ax, runs[s].out, s)
            ax.set_xlabel("step")
        row[0].set_ylabel("eigenvalues of $W W^T$")
    fig.suptitle(suptitle + "  (dashed: theory, Eqs. 9, 12, 13, 16)" if any(
        r.out["theory"] for r in runs.values()) else suptitle)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trajectory_figure(runs, path, suptitle):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.4), constrained_layout=True)
    for row, settings in zip(axes, PANELS):
        for ax, s in zip(row, settings):
            plot_trajectory(ax, runs[s], s)
    fig.suptitle(suptitle)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig5_figure(runs, path, suptitle):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    names = ("$W_0$", "$2 W_0$", "randn / 2")
    for ax, loss in zip(axes, ("euc", "cos")):
        for i, run in enumerate(runs[loss]):
            plot_eigenvalues(ax, run.out, f"{loss}: two eigenvalues, three initialisations", color=f"C{i}")
            ax.plot([], [], color=f"C{i}", label=names[i])
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(suptitle)
    fig.savefig(path, dpi=110)
    plt.close(fig)


MODE_NAMES = {"exact": "exact gradient", "paper": "paper's rule"}


def exact_vs_paper_figure(results, fig, path, suptitle):
    """Both update rules side by side, from their results files (``results``: {mode: contents}):
    pairs of rows, exact above paper, with the same axis limits within each pair. Fig. 2: the
    cosine loss without stop-grad (M=10 and M=2), the one linear row where they differ. Fig. 6:
    every row, in Fig. 2's panel order (the rules agree for iso_euc, and differ for cos and iso_cos
    only in their handling of all-zero embeddings)."""
    import matplotlib.pyplot as plt
    if fig == "fig2":
        groups = [[("fig2", "cos_nosg"), ("trajectories", "cos_nosg")]]
    else:
        groups = [[("fig6", s) for s in settings] for settings in PANELS]
    width = len(groups[0])
    figure, axes = plt.subplots(2 * len(groups), width, figsize=(3.3 * width + 0.6, 2.9 * 2 * len(groups)),
                                constrained_layout=True, squeeze=False)
    for g, columns in enumerate(groups):
        pair = axes[2 * g: 2 * g + 2]                    # (2, width): exact row, paper row
        for row, mode in zip(pair, UPDATES):
            for ax, (key, s) in zip(row, columns):
                size = "M=2" if "trajectories" in key else "M=10"
                plot_eigenvalues(ax, results[mode][key][s], f"{s}, {size}: {MODE_NAMES[mode]}")
                ax.set_xlabel("step")
            row[0].set_ylabel("eigenvalues of $W W^T$")
        for column in pair.T:                            # the same limits within the pair
            for lim in ("xlim", "ylim"):
                lows, highs = zip(*(getattr(ax, "get_" + lim)() for ax in column))
                for ax in column:
                    getattr(ax, "set_" + lim)(min(lows), max(highs))
    figure.suptitle(suptitle)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def comparison_figures(out):
    """The exact-vs-paper figures, drawn when ``out`` holds both modes' results files from the
    same configuration (``--updates both``, or one run of each mode in either order)."""
    paths = [out / RESULTS[mode] for mode in UPDATES]
    if not all(p.exists() for p in paths):
        return []
    results = {mode: json.loads(p.read_text()) for mode, p in zip(UPDATES, paths)}
    configs = [{k: v for k, v in results[mode]["config"].items() if k != "updates"} for mode in UPDATES]
    if configs[0] != configs[1]:
        print(f"{out}/: the two modes' results differ in their configuration, no exact-vs-paper figures")
        return []
    written = []
    for fig, keys, title in (
            ("fig2", ("fig2", "trajectories"), "Cosine loss without stop-grad, linear network:\nthe exact "
             "gradient (top) and the paper's rule (bottom), same samples"),
            ("fig6", ("fig6",), "Fig. 6 (ReLU on the embeddings): the exact gradient and the paper's update "
             "rules, in pairs of rows, same samples")):
        if all(key in results[mode] for key in keys for mode in UPDATES):
            exact_vs_paper_figure(results, fig, out / f"{fig}_exact_vs_paper.png", title)
            written.append(out / f"{fig}_exact_vs_paper.png")
    return written


def write_figures(figs, out, mode):
    """The figures of one update rule: file names suffixed ``_paper`` for the paper's rules."""
    suffix, note = ("", "") if mode == "exact" else ("_" + mode, ", with the paper's update rules")
    if "fig2" in figs:
        eigenvalue_figure(figs["fig2"], out / f"fig2_eigenvalues{suffix}.png",
                          f"Fig. 2 (bottom): linear network, N=15, M=10{note}")
        trajectory_figure(figs["trajectories"], out / f"fig2_trajectories{suffix}.png",
                          f"Fig. 2 (top): embeddings $Wx$ of 20 fixed inputs during training (M=2, N=6){note}; dots: final")
    if "fig6" in figs:
        eigenvalue_figure(figs["fig6"], out / f"fig6_relu{suffix}.png",
                          f"Fig. 6: as Fig. 2 with a ReLU on the embeddings{note}")
        trajectory_figure(figs["fig6_trajectories"], out / f"fig6_trajectories{suffix}.png",
                          f"Fig. 6 (top): embeddings ReLU($Wx$) of 20 fixed inputs (M=2, N=6){note}; dots: final")
    if "fig5" in figs:
        fig5_figure(figs["fig5"], out / f"fig5_initializations{suffix}.png", "Fig. 5: Euclidean eigenvalues all "
                    f"converge to 1, cosine ones to a common, initialisation-dependent value{note}")


def results_json(cfg, figs, seconds, mode):
    def entry(run):
        return {"steps": run.out["steps"], "eigenvalues": run.out["eigenvalues"], "theory": run.out["theory"]}
    out = {"config": dict(cfg, updates=mode), "seconds": seconds}
    for name in ("fig2", "fig6", "trajectories", "fig6_trajectories"):
        if name in figs:
            out[name] = {s: entry(r) for s, r in figs[name].items()}
    if "fig5" in figs:
        out["fig5"] = {loss: [entry(r) for r in runs] for loss, runs in figs["fig5"].items()}
    return out


def summary(name, run):
    """One line: final eigenvalues' range and, with a theory curve, the largest relative deviation."""
    final = run.out["eigenvalues"][-1]
    line = f"{name:<30} final eigenvalues min {min(final):10.4g}  max {max(final):10.4g}"
    if run.out["theory"] is not None:
        line += f"   max rel. deviation from theory {100 * max_deviation(run.out['eigenvalues'], run.out['theory']):.2f}%"
    return line


# ----------------------------------------------------------------------------
# Benchmark: the toy's step vs the plain per-sample loop
# ----------------------------------------------------------------------------

def bench(cfg, workers, part=20, repeats=3, steps=5):
    """The full default run, projected side by side in one run for
    - the plain per-sample loop: one setting at a time, ``samples`` fresh samples per step for
      every setting (the paper's notebook), default threads: median seconds per step x steps;
    - the toy: every job run for 1/``part`` of its steps in the real process pool (so the
      workers' competition for memory is included), scaled up and packed on ``workers`` (``makespan``).
    Returns the two projections and the jobs' projected seconds."""
    def per_step(run):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            simulate([run], steps, cfg["samples"], moment_samples=cfg["samples"], points=1)
            times.append((time.perf_counter() - start) / steps)
        return sorted(times)[len(times) // 2]

    jobs = longest_first(build_jobs(cfg, build_runs(cfg)))
    plain = sum(job.steps * per_step(Run(r.setting, r.W0, r.lr, r.relu, exact_moments=False))
                for job in jobs for r in job.runs)
    short = [Job(j.name, j.runs, j.steps // part, j.samples, j.seed, j.antithetic) for j in jobs]
    job_seconds = [sec * part for _, sec in run_jobs(short, cfg, workers)]
    packed = makespan(job_seconds, workers)
    print(f"{'plain per-sample loop, one setting at a time:':<62}{plain:7.0f} s (projected full run)")
    for job, sec in zip(jobs, job_seconds):
        print(f"{f'  toy job {job.name}':<38}{len(job.runs):2d} runs x {job.steps:6d} steps:{sec:8.0f} s")
    print(f"{f'toy, {min(workers, len(jobs))} process(es):':<62}{packed:7.0f} s (projected full run)")
    print(f"ratio: {plain / packed:.0f}x")
    return plain, packed, job_seconds


def makespan(seconds, workers):
    """When the last job ends if jobs taking ``seconds`` run in this order on ``workers`` processes,
    each process taking the next job as soon as it is free (as the process pool does)."""
    free = [0.0] * min(workers, len(seconds))          # when each worker is free again
    for sec in seconds:
        free[free.index(min(free))] += sec
    return max(free)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="figures", help="output directory (default: figures/)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--samples", type=int, help=f"fresh samples per step (default {DEFAULTS['samples']})")
    p.add_argument("--steps", type=int, help=f"steps per setting (default {DEFAULTS['steps']})")
    p.add_argument("--nopred-steps", type=int, help=f"steps of the no-predictor settings (default {DEFAULTS['nopred_steps']})")
    p.add_argument("--nopred-samples", type=int, help="samples per step of the sample-based no-predictor "
                   f"panels (default {DEFAULTS['nopred_samples']})")
    p.add_argument("--only", choices=("fig2", "fig5", "fig6"), help="run one figure only")
    p.add_argument("--updates", choices=(*UPDATES, "both"), default="exact",
                   help="exact: autograd through isoloss.py (default); paper: the paper's hand-written rules, "
                   "outputs suffixed _paper; both: both, plus fig2/fig6_exact_vs_paper.png")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="parallel processes, one thread each (default: the number of CPUs)")
    p.add_argument("--quick", action="store_true", help="small sample and step counts: seconds, for tests")
    p.add_argument("--bench", action="store_true", help="time the plain loop and the toy's step, then exit")
    args = p.parse_args(argv)
    cfg = dict(DEFAULTS, **(QUICK if args.quick else {}), seed=args.seed)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    for key in ("samples", "steps", "nopred_steps", "nopred_samples"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
        if cfg[key] < 1:
            p.error(f"--{key.replace('_', '-')} must be positive")
    if cfg["samples"] < 2 * cfg["N"]:
        p.error(f"--samples must be at least {2 * cfg['N']} (a moment batch needs n >= 2N)")
    if cfg["nopred_samples"] < 2:
        p.error("--nopred-samples must be at least 2 (one antithetic pair)")
    return args, cfg


def main(argv=None):
    args, cfg = parse_args(argv)
    if args.bench:
        return bench(cfg, args.jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    modes = UPDATES if args.updates == "both" else (args.updates,)
    figs, seconds = run_all(cfg, args.only, args.jobs, modes)
    for mode in modes:
        for name in ("fig2", "fig6", "trajectories", "fig6_trajectories"):
            for s, r in figs[mode].get(name, {}).items():
                print(summary(f"{PREFIX[mode]}{name} {s}", r))
        for loss, rs in figs[mode].get("fig5", {}).items():
            for i, r in enumerate(rs):
                print(summary(f"{PREFIX[mode]}fig5 {loss} init {i}", r))
        write_figures(figs[mode], out, mode)
    total = round(time.perf_counter() - start, 2)        # of the whole command (both modes with "both")
    for mode in modes:
        (out / RESULTS[mode]).write_text(json.dumps(results_json(cfg, figs[mode], dict(seconds[mode], total=total), mode)))
    comparison_figures(out)
    print(f"wrote {out}/ in {total:.1f} s")
    return figs


if __name__ == "__main__":
    main()
