"""Correctness checks of modkit's paged forward against Hugging Face ``transformers``.

``transformers``' modeling classes are the oracle here, never modkit's hot path. The same
checks run in the CPU test suite (float32, tight tolerance) and on a GPU through
``scripts/compare_with_hf.py`` (bfloat16, judged against what transformers itself loses in
bfloat16).
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from modkit.model import embedded_model_dir, load_model
from modkit.worker import ModelRunner, PagedKVCache, SequenceChunk

if TYPE_CHECKING:  # transformers loads in seconds: only the functions that need it import it
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# Random-weight checkpoints built from a config, no download. "qwen2.5-0.5b" has the exact
# shapes of Qwen/Qwen2.5-0.5B-Instruct; the others are small versions of each architecture.
RANDOM_MODEL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": (
        "Qwen2",
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2-untied": (
        "Qwen2",
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3": (
        "Qwen3",
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            head_dim=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "llama3": (
        "Llama",
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "qwen2.5-0.5b": (
        "Qwen2",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
}


def make_random_checkpoint(shape: str, out_dir: str | Path, seed: int = 0, tokenizer: str = "words") -> Path:
    """Save a random-weight HF checkpoint of one of ``RANDOM_MODEL_SHAPES`` to ``out_dir``.

    ``tokenizer="words"`` gives it ``word_per_id_tokenizer``: a word for every id, no chat
    template. ``tokenizer="embedded"`` gives it the embedded tiny chat model's tokenizer, chat
    template, special ids and generation config (``write_embedded_tokenizer``), so the lessons'
    chats and English prompts run on it; the vocabulary is then at least the embedded model's.
    """
    import transformers

    family, kwargs = RANDOM_MODEL_SHAPES[shape]
    if tokenizer == "embedded":
        embedded = json.loads((embedded_model_dir() / "config.json").read_text())
        special = {k: embedded[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        kwargs = {"vocab_size": embedded["vocab_size"], "max_position_embeddings": 1024, **special, **kwargs}
    elif tokenizer == "words":
        kwargs = {"vocab_size": 512, "max_position_embeddings": 1024, **kwargs}
    else:
        raise ValueError(f"tokenizer must be 'words' or 'embedded', not {tokenizer!r}")
    config = getattr(transformers, f"{family}Config")(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    model.save_pretrained(out_dir)
    if tokenizer == "embedded":
        write_embedded_tokenizer(out_dir, config.vocab_size, config.max_position_embeddings)
    else:
        word_per_id_tokenizer(config.vocab_size).save_pretrained(out_dir)
    return Path(out_dir)


def _word(i: int) -> str:
    """0 -> "a", 25 -> "z", 26 -> "ab" ...: a distinct short lowercase word for every number."""
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    letters = ""
    while True:
        i, r = divmod(i, len(alphabet))
        letters += alphabet[r]
        if i == 0:
            return letters


def word_per_id_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A fast tokenizer whose every id decodes to a short ASCII word, half of them with a leading space.

    What a random-weight checkpoint samples must turn into text as a real model's tokens do:
    without a tokenizer that knows its ids, every token decodes to nothing, and the
    incremental detokenizer, waiting for text, decodes an ever longer window (a cost no real
    model has). The words are byte-level tokens ("Ġ" is the space), like Qwen's and Llama 3's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {("Ġ" if i % 2 else "") + _word(i // 2): i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=next(iter(vocab))))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False)


EMBEDDED_TOKENIZER_FILES = ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


def write_embedded_tokenizer(out_dir: str | Path, vocab_size: int, model_max_length: int) -> None:
    """Write the embedded model's tokenizer into ``out_dir``, with a word for every id below ``vocab_size``.

    The embedded byte-level BPE knows fewer ids than a large random model samples from. Each
    id it lacks gets a new vocabulary entry, a short word (half with a leading space, "Ġ"),
    that no merge produces: encoding any text gives exactly the embedded model's ids, and
    every id decodes to text. The chat template, special tokens and generation config (its
    eos id) are copied as they are.
    """
    source, out = embedded_model_dir(), Path(out_dir)
    spec = json.loads((source / "tokenizer.json").read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the embedded tokenizer's {len(vocab)} ids")
    # BPE emits single characters as they come and a longer entry only where a merge builds it
    # (with ignore_merges it would also emit a whole word that is in the vocabulary).
    assert not spec["model"].get("ignore_merges"), "new entries must be unreachable from the merges"
    words = (("Ġ" if n % 2 else "") + _word(n // 2) for n in itertools.count())
    for token_id in range(len(vocab), vocab_size):
        vocab[next(w for w in words if len(w) > 1 and w not in vocab)] = token_id
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    for name in EMBEDDED_TOKENIZER_FILES:
        shutil.copyfile(source / name, out / name)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = model_max_length
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


@dataclass(slots=True)
class ScheduleResult:
    """Every token each sequence ran, and modkit's logits for every one of them."""

    token_ids: list[list[int]]
    logits: list[torch.Tensor]  # per sequence, (len(token_ids[i]), vocab_size)
    num_steps: int
    mixed_steps: int  # steps that held prompt chunks and decode tokens together


def run_mixed_schedule(
    runner: ModelRunner,
    prompts: list[list[int]],
    num_decode_tokens: int,
    chunk_size: int,
    seed: int = 0,
) -> ScheduleResult:
    """Run sequences through the paged forward the way a continuous-batching engine would.

    Sequence ``i`` arrives at step ``i``. Each step, each arrived sequence runs either the
    next ``chunk_size`` tokens of its prompt (so long prompts are chunked over several
    steps) or one decode token, so prompt chunks and decodes share forwards. Decode tokens
    are drawn at random (teacher forcing): the check is about logits, not about sampling.
    Blocks come from a shuffled pool, so block tables are scattered, as in a real cache.
    """
    rng = random.Random(seed)
    vocab = runner.model.config.vocab_size
    block_size = runner.kv_cache.block_size
    tokens = [list(p) + [rng.randrange(vocab) for _ in range(num_decode_tokens)] for p in prompts]
    free_blocks = list(range(runner.kv_cache.num_blocks))
    rng.shuffle(free_blocks)
    tables: list[list[int]] = [[] for _ in prompts]
    computed = [0] * len(prompts)
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    step = mixed = 0
    while any(c < len(t) for c, t in zip(computed, tokens, strict=True)):
        chunks, owners, kinds = [], [], set()
        for i in range(min(step + 1, len(prompts))):
            if computed[i] == len(tokens[i]):
                continue
            in_prompt = computed[i] < len(prompts[i])
            n = min(chunk_size, len(prompts[i]) - computed[i]) if in_prompt else 1
            kinds.add(in_prompt)
            while len(tables[i]) * block_size < computed[i] + n:
                tables[i].append(free_blocks.pop())
            new = tokens[i][computed[i] : computed[i] + n]
            chunks.append(SequenceChunk(new, computed[i], list(tables[i]), num_logits=n))
            owners.append(i)
            computed[i] += n
        if chunks:
            out = runner.execute(chunks)
            rows = 0
            for chunk, i in zip(chunks, owners, strict=True):
                logits[i].append(out[rows : rows + chunk.num_logits])
                rows += chunk.num_logits
            mixed += len(kinds) == 2
        step += 1
    return ScheduleResult(tokens, [torch.cat(lg) for lg in logits], step, mixed)


def hf_logits(hf_model: PreTrainedModel, token_ids: list[int]) -> torch.Tensor:
    """Logits of a transformers model for every position of one sequence, float32 on CPU."""
    device = next(hf_model.parameters()).device
    with torch.inference_mode():
        out = hf_model(torch.tensor([token_ids], device=device)).logits[0]
    return out.float().cpu()


def load_hf_model(model_dir: str | Path, dtype: torch.dtype, device: str | torch.device) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return model.to(device).eval()


def compare_mixed_batch(
    model_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    block_size: int = 16,
    prompt_lens: tuple[int, ...] = (7, 23, 40, 1, 16, 33),
    num_decode_tokens: int = 5,
    chunk_size: int = 8,
    seed: int = 0,
    hf_model: PreTrainedModel | None = None,
    attention_backend: str = "torch_ref",
) -> dict[str, float]:
    """Max |modkit - HF| over every logit of a mixed schedule, with HF run in the same dtype.

    Returns ``max_abs_diff`` (modkit vs HF, same dtype), and, when ``dtype`` is not float32,
    ``modkit_vs_fp32`` and ``hf_vs_fp32`` (max abs) and ``modkit_rel_err`` and ``hf_rel_err``
    (relative norm): how far each is from HF in float32, so modkit's error can be judged
    against what HF itself loses at that precision.
    """
    model = load_model(model_dir, dtype=dtype, device=device, attention_backend=attention_backend)
    vocab = model.config.vocab_size
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in prompt_lens]
    max_blocks = sum(-(-(n + num_decode_tokens) // block_size) for n in prompt_lens)
    runner = ModelRunner(model, PagedKVCache.allocate(model.config, max_blocks + 3, block_size, dtype, device))
    result = run_mixed_schedule(runner, prompts, num_decode_tokens, chunk_size, seed)
    ours = [lg.cpu() for lg in result.logits]
    hf = hf_model if hf_model is not None else load_hf_model(model_dir, dtype, device)
    theirs = [hf_logits(hf, t) for t in result.token_ids]
    stats = {
        "max_abs_diff": max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True)),
        "max_abs_logit": max(b.abs().max().item() for b in theirs),
        "num_steps": float(result.num_steps),
        "mixed_steps": float(result.mixed_steps),
    }
    if dtype != torch.float32:
        del hf
        ref_model = load_hf_model(model_dir, torch.float32, device)
        ref = [hf_logits(ref_model, t) for t in result.token_ids]
        stats["modkit_vs_fp32"] = max((a - r).abs().max().item() for a, r in zip(ours, ref, strict=True))
        stats["hf_vs_fp32"] = max((b - r).abs().max().item() for b, r in zip(theirs, ref, strict=True))
        # ||x - ref|| / ||ref|| over all logits: bf16 operands typically land between 1e-3 and 1e-2.
        ref_all = torch.cat(ref)
        stats["modkit_rel_err"] = ((torch.cat(ours) - ref_all).norm() / ref_all.norm()).item()
        stats["hf_rel_err"] = ((torch.cat(theirs) - ref_all).norm() / ref_all.norm()).item()
    return stats


@dataclass(slots=True)
class GreedyComparison:
    """modkit's greedy tokens against ``transformers``' ``generate`` for the same prompts."""

    ours: list[list[int]]
    theirs: list[list[int]]

    @property
    def num_exact(self) -> int:
        """Prompts whose whole continuation is identical."""
        return sum(a == b for a, b in zip(self.ours, self.theirs, strict=True))

    @property
    def first_divergence(self) -> list[int | None]:
        """Per prompt, the index of the first differing token (None when identical)."""
        result: list[int | None] = []
        for a, b in zip(self.ours, self.theirs, strict=True):
            diff = [i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
            result.append(diff[0] if diff else (None if len(a) == len(b) else min(len(a), len(b))))
        return result


def compare_greedy(
    model_dir: str | Path,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 24,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    block_size: int = 16,
) -> GreedyComparison:
    """All prompts in one flat batch through modkit, against HF ``generate`` one prompt at a time."""
    from modkit.worker import greedy_generate

    model = load_model(model_dir, dtype=dtype, device=device)
    eos = list(model.config.eos_token_ids)
    num_blocks = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
    runner = ModelRunner(model, PagedKVCache.allocate(model.config, num_blocks, block_size, dtype, device))
    ours = greedy_generate(runner, prompts, max_new_tokens, eos)
    hf = load_hf_model(model_dir, dtype, device)
    theirs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        # cast: transformers' stubs for generate() differ between releases (5.19 rejects this self type).
        out = cast(Any, hf).generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else 0,
        )
        theirs.append(out[0, len(prompt) :].tolist())
    return GreedyComparison(ours, theirs)
