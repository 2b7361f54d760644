"""Linear-network experiments of Sec. 3: Figs. 2, 5, 6 and every row of Table 1,
with the theory's predictions drawn beside the simulation.

    python toy.py                 # all figures into figures/, ~3.5 min on 2 CPU cores
    python toy.py --quick         # seconds, small sample and step counts (for tests)
    python toy.py --bench         # the plain per-sample loop vs the toy, projected to the full run

Setup (the paper's notebook, Sec. 3): a linear Siamese network
``z = W x`` (``W`` (M, N)), standard Gaussian inputs drawn fresh every step,
views ``x1 = x`` and ``x2 = x + sigma * eps`` (only view 2 is perturbed, so
``E[x1 x1^T] = E[x2 x1^T] = I``), closed-form predictor ``W_P = (W W^T)^alpha``
(alpha = 1) from ``isoloss.predictor`` recomputed every step without gradient,
only the view-1 branch trained (no symmetrised loss), plain gradient steps.
Every setting trains with autograd through the same ``isoloss`` functions that
train.py uses. Plotted: the eigenvalues of ``W W^T`` (those of ``W_P`` for
alpha = 1).

Theory (dashed): in this setting Eqs. 9, 12, 13 and 16 are exact mode-wise
equations for the expected update, applied once per step (``theory``). Writing
``s`` for an eigenvalue of ``W W^T`` and ``lambda = s ** alpha`` for that of
``W_P``, ``dz_m/dt = eta g(lambda) z_m`` gives ``ds/dt = 2 eta g(lambda) s``
with ``g`` in ``RATE``. For the no-stop-grad row, Eq. 12 assumes
``E[z2 z2^T] = E[z1 z2^T]``; here view 2 carries the noise,
``E[x2 x2^T] = (1 + sigma^2) I``, and the exact expected update is
``dW = -eta ((W_P - I)^2 + sigma^2 I) W``, i.e. ``g = -((1 - lambda)^2 + sigma^2)``.

How it is fast (the plain loop, one setting at a time with 50,000 fresh samples
per step as in the paper's notebook, takes about two hours here; ``--bench``):
- Common random numbers: the runs of a job train side by side on the same
  fresh samples each step.
- Exact moment batches for the linear Euclidean rows. Their loss (hence its
  gradient) depends on a batch only through the second moments of the stacked
  views ``y = (x1, x2)``. The scatter of ``n`` samples is Wishart: we draw it
  exactly (Bartlett decomposition) and feed autograd a pseudo-batch of ``2N``
  rows with exactly that scatter. Same distribution of the update as ``n``
  fresh samples, for ``O(N^2)`` instead of ``O(n N)`` work (``test_toy.py``
  checks the moments and the update against the plain loop). These runs are in
  float64: free at this size, and the no-stop-grad row decays to 1e-15.
- The three 100,000-step panels that need real samples (no predictor: cosine,
  cosine + ReLU, Euclidean + ReLU) see ``--nopred-samples`` (512) fresh samples
  per step in antithetic pairs ``x +- sigma eps`` instead of 50,000. Each step's
  update is still an unbiased estimate of the same expected update; the view
  noise that dominates these updates cancels to first order, so their spread
  stays at that of the 50,000-sample loop. Over 20,000 steps, four such runs
  agreed with a 50,000-sample run to 0.4% (cosine) and within one to two
  run-to-run standard deviations (ReLU panels, at most 1.7%); 2,048 independent
  samples instead made the Euclidean + ReLU panel drift 20% (``test_toy.py``
  checks a shortened horizon).
- The jobs run in parallel processes of one thread each (``--jobs``): the
  toy's tensors are too small for threads to pay, processes do. Each job has
  its own seeds, so ``--only`` and ``--jobs`` leave the results unchanged (up to
  float round-off: thread counts change summation order).

Departures from the notebook: the notebook's hand-written ReLU update for the
no-predictor Euclidean row omits the ReLU derivative and its no-stop-grad
cosine update is an approximation; here autograd gives the exact gradients of
the losses as the paper writes them.
"""
import argparse
import functools
import json
import math
import multiprocessing
import os
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

RATE = {  # g(lambda) of dz_m/dt = eta g(lambda_m) z_m for the linear Euclidean rows
    "euc": lambda lam, sigma: lam * (1 - lam),                                 # Eq. 9
    "euc_nosg": lambda lam, sigma: -((1 - lam) ** 2 + sigma ** 2),             # Eq. 12 + view-2 noise
    "euc_nopred": lambda lam, sigma: 0 * lam,                                  # Eq. 13
    "iso_euc": lambda lam, sigma: 1 - lam,                                     # Eq. 16
}

# Panel order of Fig. 2: (a) no stop-grad, (b) no predictor, (c) BYOL/SimSiam loss, (d) IsoLoss.
PANELS = (("euc_nosg", "euc_nopred", "euc", "iso_euc"), ("cos_nosg", "cos_nopred", "cos", "iso_cos"))

DEFAULTS = dict(
    seed=2,             # torch.manual_seed(2) then W0 = randn(M, N) / 4: the notebook's initial condition
    samples=50_000,     # fresh samples per step (notebook)
    steps=1_500,        # steps per setting (notebook)
    nopred_steps=100_000,  # steps of the two no-predictor settings (notebook)
    nopred_samples=512,    # samples per step of the sample-based 100,000-step panels (see docstring)
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

def draw_views(n, N, sigma, generator=None, antithetic=False):
    """``n`` fresh samples of the two views: x1 = x, x2 = x + sigma * eps. Each (n, N).

    ``antithetic``: n/2 fresh inputs x, each seen with the two views x +- sigma * eps. Every
    sample is still exactly distributed and the update an unbiased estimate of the same expected
    update, but the view noise, which dominates the no-predictor updates, cancels to first order.
    """
    if antithetic:
        x = torch.randn(n // 2, N, generator=generator)
        eps = sigma * torch.randn(n // 2, N, generator=generator)
        return torch.cat([x, x]), torch.cat([x + eps, x - eps])
    x1 = torch.randn(n, N, generator=generator)
    return x1, x1 + sigma * torch.randn(n, N, generator=generator)


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
    fixed: torch.Tensor = None           # (K, N) inputs whose embeddings are recorded (Fig. 2 top)
    out: dict = field(default_factory=dict)

    @property
    def moments(self):                   # linear Euclidean rows: exact moment batches
        return self.exact_moments and not self.relu and self.setting in RATE


def eigenvalues(W):
    """Sorted eigenvalues of W W^T, as squared singular values of W (non-negative, accurate when tiny)."""
    return torch.linalg.svdvals(W).flip(-1) ** 2


def embed(x, W, relu):
    """z = W x for rows of x (B, N) -> (B, M), with an optional ReLU (Fig. 6)."""
    z = x @ W.T
    return z.relu() if relu else z


def simulate(runs, steps, samples, seed=0, antithetic=False, moment_samples=DEFAULTS["samples"],
             sigma=DEFAULTS["sigma"], alpha=DEFAULTS["alpha"], points=DEFAULTS["points"]):
    """Train ``runs`` side by side for ``steps`` plain gradient steps on common random numbers.

    Sample-based runs see ``samples`` fresh views per step (``draw_views``); moment runs see an
    exact moment batch of ``moment_samples`` views. The two come from separate random streams
    (``seed``, ``seed + 1``), so no run's samples depend on which other runs share the loop.
    Records, at ~``points`` steps, the sorted eigenvalues of ``W W^T`` into ``run.out`` (and the
    embeddings of ``run.fixed``).
    """
    generator = torch.Generator().manual_seed(seed)          # views
    torch.manual_seed(seed + 1)                              # moment batches
    Ws = [r.W0.to(torch.float64 if r.moments else torch.float32, copy=True).requires_grad_() for r in runs]
    N = max(r.W0.shape[1] for r in runs)
    need_views, need_moments = not all(r.moments for r in runs), any(r.moments for r in runs)
    every = max(1, steps // points)
    for r in runs:
        r.out.update(steps=[], eigenvalues=[], trajectory=[])
    for t in range(steps + 1):
        if t % every == 0 or t == steps:
            record(runs, Ws, t)
        if t == steps:
            break
        views = draw_views(samples, N, sigma, generator, antithetic) if need_views else None
        moments = draw_moment_batch(moment_samples, N, sigma) if need_moments else None
        loss = 0
        for r, W in zip(runs, Ws):
            x1, x2 = moments if r.moments else views
            z1 = embed(x1[:, :W.shape[1]], W, r.relu)
            with torch.set_grad_enabled("nosg" in r.setting):       # the target branch: SG unless nosg
                z2 = embed(x2[:, :W.shape[1]], W, r.relu)
            W_P = W_P_half = None
            if "nopred" not in r.setting:
                W_P, W_P_half = isoloss.predictor(W.detach() @ W.detach().T, alpha, normalize=False)
            loss = loss + LOSSES[r.setting](z1, z2, W_P, W_P_half)
        grads = torch.autograd.grad(loss, Ws)
        with torch.no_grad():
            for r, W, g in zip(runs, Ws, grads):
                W.sub_(r.lr * g)
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


def fig2_runs(cfg, relu=False):
    """Eigenvalue panels (Fig. 2 bottom; Fig. 6 with ``relu``): one run per Table 1 row."""
    W0 = initial_weights(cfg, cfg["M"], cfg["N"])
    return {s: Run(s, W0, LR[s], relu=relu, long="nopred" in s) for s in SETTINGS}


def trajectory_runs(cfg):
    """Fig. 2 top: M=2, N=6, lr 0.01 for every row, 20 highest-norm of 5,000 fixed inputs."""
    torch.manual_seed(cfg["seed"])
    X = torch.randn(cfg["traj_N"], cfg["traj_inputs"]).T                        # (5000, N), notebook's draw
    fixed = X[X.norm(dim=1).argsort(descending=True)[:cfg["traj_shown"]]]       # (20, N)
    W0 = initial_weights(cfg, cfg["traj_M"], cfg["traj_N"])
    return {s: Run(s, W0, cfg["traj_lr"], fixed=fixed) for s in SETTINGS}


def fig5_runs(cfg, trajectories=None):
    """Fig. 5: M=2, three initialisations (W0, 2 W0, randn / 2), Euclidean vs cosine. The first
    is the trajectory panels' run of the same loss (same W0 and lr): reused when given."""
    W0 = initial_weights(cfg, cfg["traj_M"], cfg["traj_N"])
    inits = [W0, 2 * W0, torch.randn(cfg["traj_M"], cfg["traj_N"]) / 2]
    runs = {loss: [Run(loss, W, cfg["traj_lr"]) for W in inits] for loss in ("euc", "cos")}
    for loss in runs if trajectories else ():
        runs[loss][0] = trajectories[loss]
    return runs


def build_runs(cfg, only=None):
    """The runs of the chosen figures: {figure: {setting: Run}} ({loss: [Run]} for fig5)."""
    figs = {}
    if only in (None, "fig2"):
        figs["fig2"], figs["trajectories"] = fig2_runs(cfg), trajectory_runs(cfg)
    if only in (None, "fig6"):
        figs["fig6"] = fig2_runs(cfg, relu=True)
    if only in (None, "fig5"):
        figs["fig5"] = fig5_runs(cfg, figs.get("trajectories"))
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


JOBS = (  # name, the figures' entries whose runs it simulates, which of their runs
    ("fig2 no-predictor", ("fig2",), lambda r: r.long),
    ("fig6 no-predictor", ("fig6",), lambda r: r.long),
    ("fig2 main", ("fig2",), lambda r: not r.long),
    ("fig6 main", ("fig6",), lambda r: not r.long),
    ("M=2 panels", ("trajectories", "fig5"), lambda r: True),
)  # in this order, two workers pack the jobs into ~205 s each (measured costs 98, 82, 74, 107, 53 s)


def build_jobs(cfg, figs):
    """The independent simulations, in the order the process pool takes them. The 100,000-step
    no-predictor runs see ``--nopred-samples`` antithetic views. Each job has fixed seeds and
    always the same input size, so results do not depend on ``--only`` or ``--jobs``."""
    jobs = []
    for i, (name, keys, chosen) in enumerate(JOBS):
        runs = list({id(r): r for key in keys if key in figs for r in flatten(figs[key]) if chosen(r)}.values())
        if runs:
            long = runs[0].long
            jobs.append(Job(name, runs, cfg["nopred_steps"] if long else cfg["steps"],
                            cfg["nopred_samples"] if long else cfg["samples"], cfg["seed"] + 10 * (i + 1), long))
    return jobs


def run_job(job, cfg):
    """Simulate one job and its theory curves; returns the runs' records and the seconds it took."""
    start = time.perf_counter()
    simulate(job.runs, job.steps, job.samples, job.seed, job.antithetic,
             cfg["samples"], cfg["sigma"], cfg["alpha"], cfg["points"])
    for r in job.runs:
        r.out["theory"] = None if r.relu else theory(
            r.setting, r.out["eigenvalues"][0], r.out["steps"], r.lr, cfg["sigma"], cfg["alpha"])
    return [r.out for r in job.runs], time.perf_counter() - start


def run_jobs(jobs, cfg, workers):
    """Run ``jobs``; ``workers`` > 1: in parallel processes of one thread each (the toy's tensors
    are too small for threads to pay, processes do). Returns [(records, seconds)] per job."""
    if workers == 1:
        return [run_job(job, cfg) for job in jobs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), context, torch.set_num_threads, (1,)) as pool:
        return list(pool.map(run_job, jobs, [cfg] * len(jobs)))


def run_all(cfg, only=None, workers=1):
    """Simulate the chosen figures; returns their runs (records and theory in ``run.out``) and job timings."""
    figs = build_runs(cfg, only)
    jobs = build_jobs(cfg, figs)
    seconds = {}
    for job, (outs, sec) in zip(jobs, run_jobs(jobs, cfg, workers)):
        for r, out in zip(job.runs, outs):
            r.out = out
        seconds[job.name] = round(sec, 2)
    return figs, seconds


# ----------------------------------------------------------------------------
# Figures and results
# ----------------------------------------------------------------------------

def plot_eigenvalues(ax, run, title, color=None):
    steps, eig = run.out["steps"], torch.tensor(run.out["eigenvalues"])
    ax.plot(steps, eig.clamp(min=1e-16).numpy(), lw=1.2, color=color)
    if run.out["theory"] is not None:
        ax.plot(steps, torch.tensor(run.out["theory"]).clamp(min=1e-16).numpy(), "k--", lw=0.8)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)


def eigenvalue_figure(runs, path, suptitle):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(13, 5.6), constrained_layout=True)
    for row, settings in zip(axes, PANELS):
        for ax, s in zip(row, settings):
            plot_eigenvalues(ax, runs[s], s)
            ax.set_xlabel("step")
        row[0].set_ylabel("eigenvalues of $W W^T$")
    fig.suptitle(suptitle + "  (dashed: theory, Eqs. 9, 12, 13, 16)" if any(
        r.out["theory"] for r in runs.values()) else suptitle)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trajectory_figure(runs, path):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.4), constrained_layout=True)
    for row, settings in zip(axes, PANELS):
        for ax, s in zip(row, settings):
            traj = torch.tensor(runs[s].out["trajectory"])               # (T, K, 2)
            for k in range(traj.shape[1]):
                ax.plot(traj[:, k, 0], traj[:, k, 1], lw=0.8, color=f"C{k % 10}", alpha=0.7)
            ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=12, c=[f"C{k % 10}" for k in range(traj.shape[1])], zorder=3)
            ax.set_title(s, fontsize=10)
            ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle("Fig. 2 (top): embeddings $Wx$ of 20 fixed inputs during training (M=2, N=6); dots: final")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig5_figure(runs, path):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    names = ("$W_0$", "$2 W_0$", "randn / 2")
    for ax, loss in zip(axes, ("euc", "cos")):
        for i, run in enumerate(runs[loss]):
            plot_eigenvalues(ax, run, f"{loss}: two eigenvalues, three initialisations", color=f"C{i}")
            ax.plot([], [], color=f"C{i}", label=names[i])
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 5: Euclidean eigenvalues all converge to 1, cosine ones to a common, initialisation-dependent value")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_json(cfg, figs, seconds):
    def entry(run):
        return {"steps": run.out["steps"], "eigenvalues": run.out["eigenvalues"], "theory": run.out["theory"]}
    out = {"config": cfg, "seconds": seconds}
    for name in ("fig2", "fig6"):
        if name in figs:
            out[name] = {s: entry(r) for s, r in figs[name].items()}
    if "fig5" in figs:
        out["fig5"] = {loss: [entry(r) for r in runs] for loss, runs in figs["fig5"].items()}
    return out


def summary(name, run):
    """One line: final eigenvalues' range and, with a theory curve, the largest relative deviation."""
    final = run.out["eigenvalues"][-1]
    line = f"{name:<22} final eigenvalues min {min(final):10.4g}  max {max(final):10.4g}"
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
      workers' competition for memory is included), scaled up and packed on ``workers``."""
    def per_step(run):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            simulate([run], steps, cfg["samples"], moment_samples=cfg["samples"], points=1)
            times.append((time.perf_counter() - start) / steps)
        return sorted(times)[len(times) // 2]

    jobs = build_jobs(cfg, build_runs(cfg))
    plain = sum(job.steps * per_step(Run(r.setting, r.W0, r.lr, r.relu, exact_moments=False))
                for job in jobs for r in job.runs)
    short = [Job(j.name, j.runs, j.steps // part, j.samples, j.seed, j.antithetic) for j in jobs]
    job_seconds = [sec * part for _, sec in run_jobs(short, cfg, workers)]
    free = [0.0] * min(workers, len(jobs))          # when each worker is free again
    for sec in job_seconds:
        free[free.index(min(free))] += sec
    print(f"plain per-sample loop, one setting at a time: {plain:7.0f} s (projected full run)")
    for job, sec in zip(jobs, job_seconds):
        print(f"  toy job {job.name:<18} {len(job.runs):2d} runs x {job.steps:6d} steps: {sec:5.0f} s")
    print(f"toy, {len(free)} process(es):                    {max(free):7.0f} s (projected full run)")
    print(f"ratio: {plain / max(free):.0f}x")
    return plain, max(free)


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
    if cfg["samples"] < 2 * cfg["N"] or cfg["nopred_samples"] < 2:
        p.error(f"--samples must be at least {2 * cfg['N']} (a moment batch needs n >= 2N) "
                "and --nopred-samples at least 2 (one antithetic pair)")
    return args, cfg


def main(argv=None):
    args, cfg = parse_args(argv)
    if args.bench:
        return bench(cfg, args.jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    figs, seconds = run_all(cfg, args.only, args.jobs)
    for name in ("fig2", "fig6"):
        for s, r in figs.get(name, {}).items():
            print(summary(f"{name} {s}", r))
    for loss, rs in figs.get("fig5", {}).items():
        for i, r in enumerate(rs):
            print(summary(f"fig5 {loss} init {i}", r))
    if "fig2" in figs:
        eigenvalue_figure(figs["fig2"], out / "fig2_eigenvalues.png", "Fig. 2 (bottom): linear network, N=15, M=10")
        trajectory_figure(figs["trajectories"], out / "fig2_trajectories.png")
    if "fig6" in figs:
        eigenvalue_figure(figs["fig6"], out / "fig6_relu.png", "Fig. 6: as Fig. 2 with a ReLU on the embeddings")
    if "fig5" in figs:
        fig5_figure(figs["fig5"], out / "fig5_initializations.png")
    seconds["total"] = round(time.perf_counter() - start, 2)
    (out / "toy_results.json").write_text(json.dumps(results_json(cfg, figs, seconds)))
    print(f"wrote {out}/ in {seconds['total']:.1f} s")
    return figs


if __name__ == "__main__":
    main()
