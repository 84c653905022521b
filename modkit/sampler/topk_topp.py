"""Truncation masks (min_p, top_k, top_p) and the random draw, batched over rows.

Each mask function takes logits (N, V) and one parameter per row, and returns new logits in
which the tokens a row drops are -inf. A row whose parameter is "off" comes back bit for
bit unchanged, which is what lets rows with different parameters share one batch. Every
mask keeps a row's most likely token, so no row is ever left with nothing to sample.

They run after temperature, in vLLM's order: min_p, then top_k, then top_p. Each one sees
the distribution the previous ones left (renormalised), e.g. top_p=0.9 with top_k=50 keeps
the smallest set of the top 50 that holds 90% of *their* probability.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's largest. ``min_p`` (N,); 0 = off."""
    probs = logits.softmax(dim=-1)  # (N, V)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # (N, 1)
    return logits.masked_fill(probs < threshold, _NEG_INF)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits, and every logit tied with the k-th (as vLLM does).

    ``top_k`` (N,) int64, 0 = off; values >= V are off too. ``max_top_k`` is the largest
    ``top_k`` that is on, passed from the host so that no device value has to be read back.
    """
    vocab_size = logits.shape[1]
    off = (top_k <= 0) | (top_k >= vocab_size)  # (N,)
    k = top_k.masked_fill(off, 1)  # any valid index for the rows that are off
    top_values = logits.topk(min(max_top_k, vocab_size), dim=-1).values  # (N, max_top_k), descending
    kth_value = top_values.gather(1, (k - 1).unsqueeze(1))  # (N, 1)
    kth_value = kth_value.masked_fill(off.unsqueeze(1), _NEG_INF)  # rows that are off keep everything
    return logits.masked_fill(logits < kth_value, _NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (N,); 1 = off.

    A token is kept when the tokens ranked above it hold less than ``top_p`` of the mass, so
    the most likely token is always kept. Tokens of equal probability are ranked in sort
    order, so at the boundary one of a tie may be kept and another dropped.

    NOTE: vLLM sorts ascending and drops tokens whose cumulative probability is <= 1 - top_p.
    That is the same set up to float rounding; counting from the top reads more directly.
    """
    probs_sorted, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)  # (N, V) each
    mass_above = probs_sorted.cumsum(dim=-1) - probs_sorted  # (N, V) mass of the better-ranked tokens
    drop_sorted = mass_above >= top_p.unsqueeze(1)
    drop_sorted[:, 0] = False
    # Rows with top_p == 1 must not lose tail tokens to a cumulative sum that rounds up past 1.
    drop_sorted &= (top_p < 1).unsqueeze(1)
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, _NEG_INF)


def random_sample(
    probs: torch.Tensor,
    generators: dict[int, torch.Generator],
    shared_generator: torch.Generator,
) -> torch.Tensor:
    """Draw one token per row of ``probs`` (N, V); returns (N,) int64.

    The exponential race: with independent E_v ~ Exp(1), ``argmax_v probs_v / E_v`` is token v
    with probability probs_v (E_v / probs_v is exponential with rate probs_v, and the first of
    several exponential clocks to ring is v with probability rate_v / sum of rates). Unlike
    ``torch.multinomial`` this is a plain elementwise op and an argmax, with no sort, no
    cumulative sum and no host synchronisation.

    Row i draws its noise from ``generators[i]`` when it has one: exactly V numbers per step
    from its own generator, so its tokens do not depend on the other rows. All other rows
    share ``shared_generator``.
    """
    noise = torch.empty_like(probs)  # (N, V)
    if len(generators) < probs.shape[0]:
        noise.exponential_(generator=shared_generator)
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    # Some exponential_ kernels can return exactly 0; 0/0 would be NaN, which argmax picks.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return probs.div(noise).argmax(dim=-1)
