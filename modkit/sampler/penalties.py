"""Repetition, frequency and presence penalties, batched over rows (vLLM's ``apply_penalties``).

For each row, with ``count[v]`` the number of times token v appears in the row's *output*::

    repetition:  v in prompt or output  ->  logit / r if logit > 0 else logit * r
    frequency:   logit -= frequency_penalty * count[v]
    presence:    logit -= presence_penalty * (count[v] > 0)

Token lists arrive padded to one width with the id ``vocab_size``, which counts into an
extra column that is then cut off, so rows of different lengths need no loop. A row with
neutral penalties (r = 1, 0, 0) comes back bit for bit unchanged.
"""

from __future__ import annotations

import torch


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each token appears in each row of ``token_ids`` (N, L), padded with ``vocab_size``; (N, V) int64."""
    num_rows = token_ids.shape[0]
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.int64, device=token_ids.device)  # (N, V + 1)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids))
    return counts[:, :vocab_size]  # the padding column goes


def apply_penalties(
    logits: torch.Tensor,  # (N, V) float32
    prompt_token_ids: torch.Tensor,  # (N, Lp) int64, padded with V
    output_token_ids: torch.Tensor,  # (N, Lo) int64, padded with V
    presence_penalties: torch.Tensor,  # (N,) float32
    frequency_penalties: torch.Tensor,  # (N,) float32
    repetition_penalties: torch.Tensor,  # (N,) float32
) -> torch.Tensor:
    """The penalised logits (a new tensor)."""
    vocab_size = logits.shape[1]
    output_counts = token_counts(output_token_ids, vocab_size)  # (N, V)
    in_output = output_counts > 0
    seen = in_output | (token_counts(prompt_token_ids, vocab_size) > 0)  # (N, V)

    repetition = torch.where(seen, repetition_penalties.unsqueeze(1), 1.0)  # (N, V)
    logits = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = logits - frequency_penalties.unsqueeze(1) * output_counts
    return logits - presence_penalties.unsqueeze(1) * in_output
