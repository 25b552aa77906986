"""Closed-form baselines and the statistics of the learned attention circuits (NumPy, float64).

Baselines, for prompts ``context [B, L, d+1]`` (rows ``[x_i; y_i]``) and ``query [B, d+1]``:

* one-step GD from ``w = 0`` on the in-context loss ``(1/2L) sum_i (y_i - w^T x_i)^2`` with step
  ``eta``: ``y_hat = eta/L sum_i y_i <x_i, x_q>``;
* debiased one-step GD (the paper's predictor): ``y_hat = eta/L sum_i y_i <x_i - x_bar, x_q>``,
  a step on ``(1/2L) sum_i (y_i - w^T (x_i - x_bar))^2``;
* ridge ``beta_hat = (X^T X + lambda I)^{-1} X^T y`` (``lambda = sigma^2 d`` is the posterior
  mean, hence Bayes-optimal, for ``beta ~ N(0, I/d)``);
* the zero predictor.

The step of each GD predictor is the least-squares fit ``sum a t / sum a^2`` of its feature ``a``
on prompts from the training distribution (:func:`fit_step`);
:func:`optimal_gd_step` is the same step in closed form for isotropic data.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "PATTERN_TOL",
    "ZERO_SUM_TOL",
    "check_pattern",
    "debiased_gd_feature",
    "fit_step",
    "gd_feature",
    "optimal_gd_step",
    "pattern_stats",
    "ridge_predict",
]

# Acceptance tolerances, fixed before any training run: a structural deviation counts as small
# when it is at most PATTERN_TOL times the head's own scale (|omega_h| for KQ, max|mu| for OV);
# zero-sum means |sum_h mu_h| < ZERO_SUM_TOL * max_h |mu_h| (the criterion).
PATTERN_TOL = 0.25
ZERO_SUM_TOL = 0.1


def _split(context: np.ndarray, query: np.ndarray):
    context = np.asarray(context, np.float64)
    query = np.asarray(query, np.float64)
    return context[..., :-1], context[..., -1], query[..., :-1]


def gd_feature(context: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``(1/L) sum_i y_i <x_i, x_q>`` ``[B]``: one-step GD from zero with unit step."""
    x, y, xq = _split(context, query)
    return np.einsum("bl,bld,bd->b", y, x, xq) / x.shape[1]


def debiased_gd_feature(context: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``(1/L) sum_i y_i <x_i - x_bar, x_q>`` ``[B]``: debiased one-step GD with unit step."""
    x, y, xq = _split(context, query)
    xc = x - x.mean(axis=1, keepdims=True)
    return np.einsum("bl,bld,bd->b", y, xc, xq) / x.shape[1]


def fit_step(feature: np.ndarray, target: np.ndarray) -> float:
    """The MSE-optimal step ``eta = sum a t / sum a^2`` of the predictor ``eta * a``."""
    a = np.asarray(feature, np.float64)
    return float(np.dot(a, np.asarray(target, np.float64)) / np.dot(a, a))


def optimal_gd_step(dim: int, length: int, noise_var: float) -> float:
    """Closed-form MSE-optimal step of one-step GD for ``x ~ N(0, I_d)``, ``beta ~ N(0, I/d)``:
    with ``w = (1/L) sum_i y_i x_i``, ``E[w^T beta] = E|beta|^2 = 1`` and
    ``E|w|^2 = 1 + (d+1)/L + sigma^2 d / L``, so ``eta* = 1 / (1 + (d + 1 + sigma^2 d) / L)``."""
    return 1.0 / (1.0 + (dim + 1 + noise_var * dim) / length)


def ridge_predict(context: np.ndarray, query: np.ndarray, lam: float) -> np.ndarray:
    """Ridge prediction ``x_q^T (X^T X + lam I)^{-1} X^T y`` per prompt ``[B]``."""
    x, y, xq = _split(context, query)
    gram = np.einsum("bld,ble->bde", x, x) + lam * np.eye(x.shape[-1])
    beta = np.linalg.solve(gram, np.einsum("bld,bl->bd", x, y)[..., None])[..., 0]
    return np.einsum("bd,bd->b", beta, xq)


# ---- circuits ---------------------------------------------------------------------------------
def pattern_stats(kq: np.ndarray, ov: np.ndarray) -> dict[str, list[float] | float]:
    """Per-head statistics of ``KQ [H, d+1, d+1]`` and ``OV [H, d+1]`` (see
    :func:`experiments.icl_regression.model.circuits`).

    Returns lists over heads: ``omega`` (mean x-diagonal of KQ), ``diag_spread``
    (``max |diag_x - omega|``), ``offdiag`` (max |off-diagonal| of the x block), ``y_col``
    (max |KQ[:d, d]|: query x against key y, which would make attention depend on y_i),
    ``y_row`` (max |KQ[d, :]|: the query's y slot, multiplied by the query's 0, so it has no
    effect and is never trained), ``mu`` (OV last entry), ``ov_x`` (max |OV[:d]|),
    ``mu_omega``; and scalars ``mu_sum`` and ``eta_eff = sum_h mu_h omega_h / sqrt(d+1)``, the
    step of the debiased GD predictor the small-omega expansion gives.
    """
    kq = np.asarray(kq, np.float64)
    ov = np.asarray(ov, np.float64)
    d = kq.shape[-1] - 1
    xblock = kq[:, :d, :d]
    diag = np.diagonal(xblock, axis1=1, axis2=2)
    omega = diag.mean(axis=1)
    off = xblock - np.einsum("hi,ij->hij", diag, np.eye(d))
    mu = ov[:, d]
    return {
        "omega": omega.tolist(),
        "diag_spread": np.abs(diag - omega[:, None]).max(axis=1).tolist(),
        "offdiag": np.abs(off).max(axis=(1, 2)).tolist() if d > 1 else [0.0] * len(omega),
        "y_col": np.abs(kq[:, :d, d]).max(axis=1).tolist(),
        "y_row": np.abs(kq[:, d, :]).max(axis=1).tolist(),
        "mu": mu.tolist(),
        "ov_x": np.abs(ov[:, :d]).max(axis=1).tolist(),
        "mu_omega": (mu * omega).tolist(),
        "mu_sum": float(mu.sum()),
        "eta_eff": float((mu * omega).sum() / math.sqrt(d + 1)),
    }


def check_pattern(stats: dict, tol: float = PATTERN_TOL,
                  zero_sum_tol: float = ZERO_SUM_TOL) -> dict[str, bool | list[int]]:
    """The acceptance test on :func:`pattern_stats`: the two heads with the largest ``|mu|``
    (``active``) have KQ x-diagonals of opposite sign, each homogeneous with small off-diagonal
    and y-column entries (each at most ``tol |omega_h|``); OV is last-entry-only in every head
    (``max |OV[:d]| <= tol max |mu|``); and ``|sum mu| < zero_sum_tol max |mu|``.
    A single head fails ``opposite_signs`` by definition. Returns each check and ``ok`` (all)."""
    omega, mu = np.asarray(stats["omega"]), np.asarray(stats["mu"])
    active = [int(h) for h in np.argsort(-np.abs(mu))[:2]]
    max_mu = float(np.abs(mu).max())
    opposite = len(active) == 2 and omega[active[0]] * omega[active[1]] < 0
    diag_ok = all(stats["diag_spread"][h] <= tol * abs(omega[h])
                  and stats["offdiag"][h] <= tol * abs(omega[h])
                  and stats["y_col"][h] <= tol * abs(omega[h]) for h in active)
    last_entry = max(stats["ov_x"]) <= tol * max_mu
    zero_sum = abs(stats["mu_sum"]) < zero_sum_tol * max_mu
    checks = {"opposite_signs": bool(opposite), "diagonal_homogeneous": bool(diag_ok),
              "last_entry_only": bool(last_entry), "zero_sum": bool(zero_sum)}
    return {**checks, "ok": all(checks.values()), "active": active}
