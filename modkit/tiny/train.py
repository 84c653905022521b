"""Train the tiny chat model: BPE tokenizer, a 4-layer Qwen2, and a Hugging Face folder.

The whole pipeline, in order (``make_tiny_model`` runs it)::

    make_corpus ─► train_tokenizer ─► encode_stream ─► train_model ─► save_model
                                                                          │
       model card + training_log.json ◄── sample answers ◄── reload + check logits

The steps live beside this module: the corpus in ``corpus``, the tokenizer in
``tokenizer``, the folder (config, weights, tokenizer files, the reload check) in
``folder``; this module trains the model and runs the whole pipeline. The folder loads
with ``AutoTokenizer`` / ``Qwen2ForCausalLM.from_pretrained`` in transformers 4.5x and 5.x.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from modkit.tiny.card import write_model_card
from modkit.tiny.corpus import make_corpus
from modkit.tiny.folder import (
    MAX_POSITION_EMBEDDINGS,
    load_checked,
    model_config_dict,
    padded_vocab_size,
    save_model,
    save_tokenizer,
    write_json,
)
from modkit.tiny.tokenizer import CHAT_TEMPLATE as CHAT_TEMPLATE  # re-exported: the tests read it here
from modkit.tiny.tokenizer import encode_stream, train_tokenizer

SAMPLE_QUESTIONS = [
    "Hello!",
    "What does a cow say?",
    "What is 2 plus 3?",
    "What is the capital of France?",
    "Who are you?",
    "What color is the sky?",
]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """How the tiny model is made. The defaults are the ones the committed model used."""

    steps: int = 2000  # optimizer steps; 1000 x 8 x 256 tokens is about one epoch, 2000 learns more facts
    seed: int = 0  # seeds the corpus, the weight init and the batch order
    num_docs: int = 40_000  # corpus documents, about 2M tokens
    batch_size: int = 8
    seq_len: int = 256  # training window; longer prompts are out of distribution
    lr: float = 2e-3  # high, as a 3.7M-parameter model tolerates
    warmup_steps: int = 50  # linear warm-up, then cosine decay
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.1  # on matrices only, not on norms and biases
    grad_clip: float = 1.0
    val_fraction: float = 0.05  # the last documents, held out for the validation loss
    vocab_size_target: int = 4096  # BPE stops earlier when the corpus has no more merges
    log_every: int = 50
    val_every: int = 250
    num_threads: int = 2  # fixed, since CPU float sums depend on the thread count

    def __post_init__(self) -> None:
        for name in ("steps", "num_docs", "batch_size", "seq_len", "log_every", "val_every", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.seq_len >= MAX_POSITION_EMBEDDINGS:
            raise ValueError(f"seq_len must be < {MAX_POSITION_EMBEDDINGS}")


@dataclass(slots=True)
class TrainResult:
    """What training measured; written to training_log.json and the model card."""

    log: list[dict[str, float]] = field(default_factory=list)  # every log_every steps
    val_log: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def sample_batch(
    tokens: torch.Tensor, starts: torch.Tensor, gen: torch.Generator, batch_size: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``seq_len + 1`` tokens, each beginning at a document start.

    NOTE: windows start at a document so that position 0 looks like inference, where the
    chat prompt begins the sequence. A window runs on across later documents.
    """
    ok = starts[starts <= len(tokens) - seq_len - 1]
    picks = ok[torch.randint(len(ok), (batch_size,), generator=gen)]
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in picks.tolist()])
    return windows[:, :-1], windows[:, 1:]  # inputs, targets: (B, T) each


def lm_loss(model: Qwen2ForCausalLM, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position."""
    logits = model(input_ids=inputs).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def val_loss(model: Qwen2ForCausalLM, tokens: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    """Loss over consecutive, non-overlapping windows of the held-out stream."""
    model.eval()
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    losses = [
        lm_loss(
            model, tokens[i * seq_len : (i + 1) * seq_len][None], tokens[i * seq_len + 1 : (i + 1) * seq_len + 1][None]
        ).item()
        for i in range(n)
    ]
    model.train()
    return sum(losses) / len(losses)


def train_model(
    model: Qwen2ForCausalLM, train: tuple[torch.Tensor, torch.Tensor], val_tokens: torch.Tensor, cfg: TrainConfig
) -> TrainResult:
    """AdamW with warm-up and cosine decay, gradient clipping, progress every log_every."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    result, recent = TrainResult(), []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        inputs, targets = sample_batch(*train, gen, cfg.batch_size, cfg.seq_len)
        loss = lm_loss(model, inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        recent.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            entry = {
                "step": step,
                "train_loss": sum(recent) / len(recent),
                "lr": float(sched.get_last_lr()[0]),
                "elapsed_s": time.perf_counter() - t0,
            }
            result.log.append(entry)
            recent = []
            print(
                f"step {step:5d}  loss {entry['train_loss']:.4f}  lr {entry['lr']:.2e}  "
                f"elapsed {entry['elapsed_s']:.0f}s",
                flush=True,
            )
        if step % cfg.val_every == 0 or step == cfg.steps:
            result.val_log.append({"step": step, "val_loss": val_loss(model, val_tokens, cfg.seq_len)})
            print(f"step {step:5d}  val loss {result.val_log[-1]['val_loss']:.4f}", flush=True)
    result.train_seconds = time.perf_counter() - t0
    return result


def chat_reply(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, question: str, max_new_tokens: int = 40
) -> tuple[str, bool]:
    """Greedy reply to one user message through the chat template.

    Returns ``(reply, stopped)``: the reply without special tokens, and whether generation
    ended on the eos token ``<|im_end|>`` rather than at ``max_new_tokens``.
    """
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, prompt_len)
    with torch.no_grad():
        # cast: transformers' stubs for generate() differ between releases (5.19 rejects this self type).
        out = cast(Any, model).generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    stopped = bool(new) and new[-1] == tokenizer.eos_token_id
    reply = tokenizer.decode(new, skip_special_tokens=True)
    assert isinstance(reply, str)
    return reply, stopped


# --- the whole pipeline ----------------------------------------------------------------


def make_tiny_model(cfg: TrainConfig, out: Path, command: str) -> dict[str, Any]:
    """Build the corpus, train tokenizer and model, save to ``out``, check and describe it.

    Returns the training log (also written to ``out/training_log.json``).
    """
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads)
    out.mkdir(parents=True, exist_ok=True)

    docs = make_corpus(cfg.num_docs, cfg.seed)
    n_val = max(1, int(len(docs) * cfg.val_fraction))
    tok = train_tokenizer(docs[:-n_val], cfg.vocab_size_target)
    save_tokenizer(tok, out)
    train_stream = encode_stream(tok, docs[:-n_val])
    val_tokens, _ = encode_stream(tok, docs[-n_val:])
    vocab = tok.get_vocab_size()
    print(
        f"corpus: {len(docs)} docs, {len(train_stream[0])} train tokens, {len(val_tokens)} val tokens, vocab {vocab}",
        flush=True,
    )

    config = Qwen2Config(
        **{
            k: v
            for k, v in model_config_dict(padded_vocab_size(vocab)).items()
            if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")
        }
    )
    model = Qwen2ForCausalLM(config)
    num_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    print(f"model: {num_params} parameters", flush=True)
    result = train_model(model, train_stream, val_tokens, cfg)

    save_model(model, out, padded_vocab_size(vocab))
    loaded = load_checked(out, model)
    tokenizer = AutoTokenizer.from_pretrained(out)
    samples = {q: chat_reply(loaded, tokenizer, q) for q in SAMPLE_QUESTIONS}
    for q, (reply, stopped) in samples.items():
        print(f"{q!r} -> {reply!r}{' <|im_end|>' if stopped else ' (no eos)'}", flush=True)

    log: dict[str, Any] = {
        "command": command,
        "config": asdict(cfg),
        "vocab_size": vocab,
        "padded_vocab_size": padded_vocab_size(vocab),
        "num_params": num_params,
        "num_train_tokens": len(train_stream[0]),
        "num_val_tokens": len(val_tokens),
        "log": result.log,
        "val_log": result.val_log,
        "final_train_loss": result.log[-1]["train_loss"],
        "final_val_loss": result.val_log[-1]["val_loss"],
        "train_seconds": result.train_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "samples": [{"question": q, "reply": r, "stopped_at_eos": s} for q, (r, s) in samples.items()],
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    write_json(out / "training_log.json", log)
    write_model_card(out / "README.md", log)
    return log
