"""lm-evaluation-harness, unchanged, against the six-process pipeline's OpenAI API.

``lm_eval``'s ``local-completions`` model is what researchers point at a vLLM server. Its
loglikelihood requests send token-id prompts with ``echo``, ``logprobs=1`` and ``max_tokens=1``,
and read each prompt token's logprob back; it tokenizes through the server (``/tokenizer_info``,
``/tokenize``, ``/detokenize``), so it needs no copy of the tokenizer. The task is a YAML file
over local JSON lines, so nothing is downloaded. The oracle is HF transformers: the same
continuation's log-probability given the same context, in float32.

Skipped where lm-eval is not installed (``pip install "lm-eval[api]"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from modkit import Pipeline
from modkit.checks import load_hf_model
from modkit.model import embedded_model_dir, load_tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the client under test")

pytestmark = pytest.mark.slow

DOCS: list[dict[str, Any]] = [
    {"question": "What does a cow say?", "choices": [" Moo", " Woof", " Meow"], "answer": 0},
    {"question": "What does a dog say?", "choices": [" Moo", " Woof", " Meow"], "answer": 1},
    {"question": "What is the capital of France?", "choices": [" Paris", " Tokyo"], "answer": 0},
]


def write_task(folder: Path) -> None:
    """A multiple-choice task over local data: one loglikelihood request per choice."""
    data = folder / "animals.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (folder / "animals.yaml").write_text(
        "task: modkit_animals\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n"
    )


def hf_loglikelihood(model: torch.nn.Module, tokenizer: object, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as lm-eval's API models do: the whole text, split
    where the context's own tokens end."""
    encode = tokenizer.encode  # type: ignore[attr-defined]
    whole = encode(context + continuation, add_special_tokens=False)
    num_context = len(encode(context, add_special_tokens=False))
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(num_context, len(whole)))


def test_lm_evals_loglikelihoods_are_hfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_task(tmp_path)
    with Pipeline.launch(ports="auto", progress=False) as pipeline:
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model={pipeline.model_name},base_url={pipeline.url}/v1/completions,num_concurrent=1",
            tasks=["modkit_animals"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            log_samples=True,
        )
    assert results is not None
    samples = results["samples"]["modkit_animals"]
    assert len(samples) == len(DOCS)
    model = load_hf_model(embedded_model_dir(), torch.float32, "cpu")
    tokenizer = load_tokenizer(embedded_model_dir())
    scored = 0
    for sample in samples:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            served, _is_greedy = response[0]
            expected = hf_loglikelihood(model, tokenizer, context, continuation)
            assert served == pytest.approx(expected, abs=1e-3), (context, continuation)
            scored += 1
    assert scored == sum(len(doc["choices"]) for doc in DOCS)
    accuracy = results["results"]["modkit_animals"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0
