"""The regression behind ``CostModel.fit``: least squares with non-negative coefficients, made robust.

A live run's steps are mostly ordinary, with patches where the machine was busy elsewhere
(on a shared CPU box, steps of 20 to 30 ms where 5 ms is usual). Plain least squares weighs
each step by its squared miss, so a few stalls pull every coefficient toward themselves.
``robust_nonnegative_fit`` is Huber's M-estimate, found by iteratively reweighted least
squares (IRLS)::

    weights = 1 for every step
    repeat:  coefficients = the non-negative least squares fit, each step's row times sqrt(weight)
             residual     = measured - predicted, for each step
             scale        = 1.4826 x median |residual|          (the residuals' spread, robustly)
             weight       = 1 if |residual| <= k x scale, else k x scale / |residual|
    until the coefficients stop moving

Ordinary steps keep a weight of 1, as in least squares; a step more than k scales off the
fit pulls on it only as hard as one k scales off would, so a few stalls four times the usual
step move the fit by a fraction of an ordinary step's spread, not by a share of the stall.

Then, from Huber's fit, a few more rounds with Tukey's bisquare weights, which fall to 0 for a
row more than c scales off: a row far off stops pulling at all. Huber's pull is bounded, not
nothing, and it adds up: with one stall in ten steps, fitted on pairs of steps (one in five
pairs holds a stall), Huber alone priced a step up to 20% above the ordinary one; Huber
first, so that the bisquare, which has many solutions, starts near the right one.
"""

from __future__ import annotations

import itertools

import numpy as np

HUBER_K = 1.345  # Huber's usual constant: 95% as efficient as least squares when there are no outliers
MAD_TO_SIGMA = 1.4826  # median |residual| x this estimates a normal spread's sigma
BISQUARE_C = 4.685  # Tukey's usual constant: 95% as efficient as least squares when there are no outliers


def nonnegative_least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin ||x c - y|| over c >= 0, exactly: the best unconstrained fit on each subset of the
    columns, kept if all its coefficients are >= 0 (2^columns subsets: fine for a handful)."""
    num_columns = x.shape[1]
    best, best_residual = np.zeros(num_columns), float(np.sum(y**2))
    for size in range(1, num_columns + 1):
        for subset in itertools.combinations(range(num_columns), size):
            columns = list(subset)
            c, *_ = np.linalg.lstsq(x[:, columns], y, rcond=None)
            if np.any(c < 0):
                continue
            residual = float(np.sum((x[:, columns] @ c - y) ** 2))
            if residual < best_residual:
                best, best_residual = np.zeros(num_columns), residual
                best[columns] = c
    return best


def robust_nonnegative_fit(
    x: np.ndarray, y: np.ndarray, k: float = HUBER_K, max_iterations: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Huber's fit of ``y`` on the columns of ``x``, then the bisquare's, coefficients >= 0 (see
    the module docstring).

    Returns the coefficients and each row's final weight (1: an ordinary row; below 1: counted
    as an outlier, the lower the further off)."""
    # A floor under the scale: when nearly every row is fitted exactly, the median residual is 0.
    floor = 1e-9 * float(np.median(np.abs(y))) + 1e-15
    coefficients = nonnegative_least_squares(x, y)

    def huber(r: np.ndarray) -> np.ndarray:
        return np.minimum(1.0, k / np.maximum(r, 1e-300))

    def bisquare(r: np.ndarray) -> np.ndarray:
        return np.where(r < BISQUARE_C, (1.0 - (r / BISQUARE_C) ** 2) ** 2, 0.0)

    weights = np.ones(len(y))
    for weigh in (huber, bisquare):
        for _ in range(max_iterations):
            residuals = np.abs(y - x @ coefficients)
            scale = max(MAD_TO_SIGMA * float(np.median(residuals)), floor)
            weights = weigh(residuals / scale)
            root = np.sqrt(weights)
            refitted = nonnegative_least_squares(x * root[:, None], y * root)
            moved = float(np.max(np.abs(refitted - coefficients)))
            coefficients = refitted
            if moved <= 1e-9 * float(np.max(np.abs(coefficients))) + 1e-15:
                break
    return coefficients, weights
