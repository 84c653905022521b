"""The model card (README.md) of the embedded model, written from its training log."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_model_card(path: Path, log: dict[str, Any]) -> None:
    """README.md for the model folder: how it was made, what it answers, its limits."""
    cfg = log["config"]
    samples = "\n".join(
        f"| {s['question']} | {_table_cell(s['reply'])} | {'yes' if s['stopped_at_eos'] else 'no'} |"
        for s in log["samples"]
    )
    v = log["versions"]
    path.write_text(f"""# tiny-chat

A 4-layer Qwen2 chat model ({log["num_params"] / 1e6:.2f}M parameters, float32) that
modkit makes itself, so lessons run offline with a real Hugging Face checkpoint. It was
trained from scratch on a synthetic corpus from the grammar in `modkit/tiny/corpus.py`:
simple sentences, short stories, and ChatML conversations about greetings, colors,
animal sounds, sums of numbers 0-20, opposites, capitals, counting and days of the week.

Made with:

    {log["command"]}

| what | value |
| --- | --- |
| seed | {cfg["seed"]} |
| steps | {cfg["steps"]} (batches of {cfg["batch_size"]} x {cfg["seq_len"]} tokens) |
| optimizer | AdamW, lr {cfg["lr"]}, {cfg["warmup_steps"]} warm-up steps, cosine to \
{cfg["min_lr_ratio"]:.0%}, weight decay {cfg["weight_decay"]}, grad clip {cfg["grad_clip"]} |
| corpus | {cfg["num_docs"]} documents, {log["num_train_tokens"]} train tokens, \
{log["num_val_tokens"]} validation tokens |
| training time | {log["train_seconds"] / 60:.1f} min on {cfg["num_threads"]} CPU threads |
| final train loss | {log["final_train_loss"]:.3f} (mean of the last {cfg["log_every"]} steps) |
| final validation loss | {log["final_val_loss"]:.3f} |
| vocabulary | {log["vocab_size"]} tokens (byte-level BPE), embedding padded to \
{log["padded_vocab_size"]} |
| architecture | 4 layers, hidden 256, 4 heads, 2 KV heads, head_dim 64, MLP 768, \
tied embeddings, RoPE theta 10000 |
| versions | torch {v["torch"]}, transformers {v["transformers"]}, \
tokenizers {v["tokenizers"]} |

Special tokens: `<|endoftext|>` (id 0, pad and document separator), `<|im_start|>` (1),
`<|im_end|>` (2, eos). The chat template is ChatML: each message is
`<|im_start|>{{role}}\\n{{content}}<|im_end|>\\n`, then `<|im_start|>assistant\\n`.

## Sample answers

Greedy decoding, at most 40 new tokens, through the chat template:

| question | reply | stopped at eos |
| --- | --- | --- |
{samples}

## Limits

- A toy, not a knowledge source: it knows only what the grammar says, often mixes up
  the facts it does know (sums, capitals), and answers other questions with fluent
  nonsense in the same shapes.
- Trained only on {cfg["seq_len"]}-token windows: longer prompts are out of
  distribution, although positions go up to 1024.
- `training_log.json` has the loss every {cfg["log_every"]} steps, the validation
  losses and timings.
""")


def _table_cell(text: str) -> str:
    """``text`` as one cell of a Markdown table: newlines shown as ``\\n``, pipes escaped."""
    return text.replace("\n", "\\n").replace("|", "\\|")
