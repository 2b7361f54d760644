"""toy.py: every row of Table 1 on short runs, the theory curves against the
simulation, the exact-moment shortcut and the reduced-sample panels against
the plain per-sample loop, and the command line. CPU only."""
import contextlib
import io
import json

import pytest
import torch

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
    """The three cosine rows with a predictor, 600 steps on 4,000 fresh samples per step."""
    return train("cos", "cos_nosg", "iso_cos", steps=600)


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


def test_cos_without_stop_grad_the_largest_diverges(cosine):
    s = cosine["cos_nosg"]
    largest = s[:, -1]
    assert (largest[1:] >= largest[:-1] * (1 - 1e-3)).all() and largest[-1] > 1.3 * largest[0]
    assert spread(s[-1]) > 100 * spread(s[0])                      # no equalisation: runaway


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
    """``python toy.py --quick`` (parallel jobs, the default), its output folder and printout."""
    out = tmp_path_factory.mktemp("quick")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        toy.main(["--quick", "--out", str(out)])
    return out, printed.getvalue()


def test_quick_run_writes_figures_and_json(quick):
    out, printed = quick
    for name in ("fig2_trajectories", "fig2_eigenvalues", "fig5_initializations", "fig6_relu"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    res = json.loads((out / "toy_results.json").read_text())
    assert set(res) >= {"config", "fig2", "fig5", "fig6", "seconds"}
    assert res["config"]["samples"] == toy.QUICK["samples"] and res["config"]["seed"] == 2
    for fig in ("fig2", "fig6"):
        assert set(res[fig]) == set(toy.SETTINGS)
        for s, r in res[fig].items():
            assert len(r["steps"]) >= 200 and len(r["eigenvalues"]) == len(r["steps"])
            assert r["steps"][-1] == (toy.QUICK["nopred_steps"] if "nopred" in s else toy.QUICK["steps"])
            assert all(len(e) == 10 for e in r["eigenvalues"])
            assert (r["theory"] is not None) == (fig == "fig2" and s in toy.RATE)
    assert len(res["fig5"]["euc"]) == len(res["fig5"]["cos"]) == 3
    assert "fig2 euc " in printed and "deviation from theory" in printed


def test_results_do_not_depend_on_only_or_jobs(quick, tmp_path):
    """Each figure's jobs have their own random streams: --only fig5 --jobs 1 (in-process, default
    threads) repeats the parallel run's fig5 up to the round-off of a different thread count."""
    toy.main(["--quick", "--only", "fig5", "--jobs", "1", "--out", str(tmp_path)])
    assert (tmp_path / "fig5_initializations.png").exists() and not (tmp_path / "fig2_eigenvalues.png").exists()
    alone = json.loads((tmp_path / "toy_results.json").read_text())["fig5"]
    together = json.loads((quick[0] / "toy_results.json").read_text())["fig5"]
    for loss in ("euc", "cos"):
        for a, b in zip(alone[loss], together[loss]):
            torch.testing.assert_close(torch.tensor(a["eigenvalues"]), torch.tensor(b["eigenvalues"]),
                                       rtol=1e-4, atol=1e-7)


def test_bad_arguments():
    for argv in (["--steps", "0"], ["--samples", "10"], ["--jobs", "0"]):
        with pytest.raises(SystemExit):
            toy.main(argv)


def test_default_initial_condition_is_the_notebooks():
    W0 = toy.initial_weights(toy.DEFAULTS, 10, 15)
    torch.manual_seed(2)
    assert torch.equal(W0, torch.randn(10, 15) / 4)
