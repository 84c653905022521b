"""``Coverage``: which steps a fitted cost model's recording held, and how far a what-if goes beyond them.

A fitted cost model is a plane through the recorded steps' times. Where a simulated step
looks like the recorded ones, the model interpolates; where it does not, it extrapolates,
and a coefficient the recording hardly pinned down decides the answer. Two ways a step can
be unlike the recording's:

- **further out**: more requests in a step than the recording ever had (a what-if at twice
  the traffic), longer contexts, bigger prompt chunks;
- **a new mix**: features that always moved together in the recording moving apart. If every
  recorded prompt step computed one prompt of one length, the fit cannot tell a prompt
  token's cost from a prompt step's, and it splits their sum between them as it happens to;
  a what-if with another chunk size (a smaller budget) or several prompts in one step then
  depends on that split.

Both are measured by one number, a step's **leverage** over the recording (the "hat value"
of linear regression)::

    h(x) = x^T (X^T X)^+ x       X: the recorded steps' features, one row per step

For a recorded step h is between 0 and 1 (the recorded steps' add up to the number of
directions they moved in); a step far from the recorded ones, along a direction in which they
hardly moved, gets a large one. A step that moves in a direction the recording never moved
at all (a feature that was always 0 there, or two features that were always in one ratio)
gets an infinite one, however small the move. h does not change when a feature is measured
in other units; each feature is divided by its norm before the pseudo-inverse only to keep
the arithmetic in range.

A step is **unlike the recording's** when its leverage is above that of 99 in 100 of the
recorded steps (``edge``). A replay of the recorded run finds about 1% of its steps so; on the
2-core box, live runs of the same configuration 1 to 8%, and runs at twice the rate 19 to 24%
(decodes a step up to 14 at p99 where the recording had 5), the runs whose inter-token
latency the fit then missed by the most (docs/benchmarks.md). It says where an answer rests
on extrapolation, not how far off it is: a fit carries the price its recording measured to
steps like the recorded ones too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

EDGE_PERCENTILE = 99.0  # a step is unlike the recording's beyond the leverage of this share of its own
RANK_TOLERANCE = 1e-9  # directions the recording moved in less than this (of the most it moved) it never moved in
NEW_DIRECTION = 1e-6  # a step's part outside the recording's directions, over its size, that counts as one
# Up to this share of steps unlike the recording's, a run is as like it as a rerun of its configuration
# (1 to 8% on the 2-core box), and ``Extrapolation.__str__`` names no new mix.
RERUN_SHARE = 0.08

# What each feature counts, in words (for ``Extrapolation.__str__``).
WORDS = {
    "num_prompt_tokens": "prompt tokens a step",
    "prompt_attention_tokens": "prompt attention pairs a step",
    "num_decode_tokens": "decodes a step",
    "decode_context_tokens": "KV tokens the decodes read a step",
    "num_seqs": "requests a step",
    "batched": "steps of two or more requests",
    "prompt_step": "steps with a prompt chunk",
}


@dataclass(frozen=True, slots=True)
class Extrapolation:
    """How far some steps (a simulation's, another run's) lie beyond a cost model's recording."""

    outside: float  # share of the steps unlike the recording's (leverage above its edge)
    num_steps: int
    # feature -> (these steps' p99, the recording's p99), for each feature these steps take further
    beyond: dict[str, tuple[float, float]]

    def __str__(self) -> str:
        text = f"{self.outside:.0%} of {self.num_steps} steps unlike the recording's"
        further = []
        for name, (here, recorded) in self.beyond.items():
            if name in ("batched", "prompt_step"):  # 0 or 1: the recording had none
                further.append(f"{WORDS[name]} (none recorded)")
            elif name in WORDS:
                further.append(f"{WORDS[name]} {here:.3g} at p99 (recorded: {recorded:.3g})")
        if further:
            return f"{text}; " + ", ".join(further)
        return f"{text} (new mixes of the same features)" if self.outside > RERUN_SHARE else text


@dataclass(frozen=True, slots=True)
class Coverage:
    """The recording a cost model was fitted on, as far as telling its steps from others needs."""

    features: tuple[str, ...]  # the columns of every row
    scale: tuple[float, ...]  # each feature's norm over the recording (1 where it was always 0)
    never: tuple[bool, ...]  # features always 0 in the recording
    directions: tuple[tuple[float, ...], ...]  # the recording's directions (right singular vectors), scaled
    sizes: tuple[float, ...]  # how far it moved along each (singular values)
    edge: float  # the recording's own leverage at EDGE_PERCENTILE
    upper: dict[str, float]  # feature -> its p99 over the recording
    num_steps: int

    @classmethod
    def of_steps(cls, features: tuple[str, ...], rows: np.ndarray) -> Coverage:
        """From the recorded steps' features (``rows``: one step a row, one feature a column)."""
        if rows.ndim != 2 or rows.shape[1] != len(features) or len(rows) == 0:
            raise ValueError(f"rows must be steps x {len(features)} features, got shape {rows.shape}")
        norms = np.linalg.norm(rows, axis=0)
        scale = np.where(norms > 0, norms, 1.0)
        _, sizes, vt = np.linalg.svd(rows / scale, full_matrices=False)
        kept = sizes > RANK_TOLERANCE * sizes[0] if sizes[0] > 0 else np.zeros(len(sizes), dtype=bool)
        partial = cls(
            features=tuple(features),
            scale=tuple(float(s) for s in scale),
            never=tuple(bool(n == 0) for n in norms),
            directions=tuple(tuple(float(v) for v in row) for row in vt[kept]),
            sizes=tuple(float(s) for s in sizes[kept]),
            edge=0.0,
            upper={name: float(u) for name, u in zip(features, np.percentile(rows, 99, axis=0), strict=True)},
            num_steps=len(rows),
        )
        return dataclasses.replace(partial, edge=float(np.percentile(partial.leverage(rows), EDGE_PERCENTILE)))

    def leverage(self, rows: np.ndarray) -> np.ndarray:
        """Each step's leverage over the recording (``inf``: a direction it never moved in)."""
        z = rows / np.asarray(self.scale)
        v, sizes = np.asarray(self.directions).reshape(-1, len(self.features)), np.asarray(self.sizes)
        along = z @ v.T  # each step's coordinates along the recording's directions
        h = np.sum((along / sizes) ** 2, axis=1)
        off = np.linalg.norm(z - along @ v, axis=1)
        new = off > NEW_DIRECTION * np.maximum(np.linalg.norm(z, axis=1), 1e-300)
        new |= (rows[:, np.asarray(self.never)] != 0).any(axis=1)
        return np.where(new, np.inf, h)

    def of(self, rows: np.ndarray) -> Extrapolation:
        """How far the steps ``rows`` (same columns as the recording's) lie beyond it."""
        if len(rows) == 0:
            return Extrapolation(0.0, 0, {})
        outside = float(np.mean(self.leverage(rows) > self.edge))
        p99 = np.percentile(rows, 99, axis=0)
        beyond = {
            name: (float(here), self.upper[name])
            for name, here in zip(self.features, p99, strict=True)
            if here > self.upper[name] * (1 + 1e-9) and name != "step"
        }
        return Extrapolation(outside, len(rows), beyond)

    def describe(self) -> dict[str, object]:
        """As plain values, for a trace's meta."""
        return {"num_steps": self.num_steps, "edge": self.edge, "upper": self.upper}
