"""One step loop (``modkit.worker.executor.StepExecutor``) in-process and in the pipeline.

A seeded request keeps its sampling state, and so its generator, across a preemption: it
samples the same tokens whether or not it was preempted, in ``LLM`` as in the six-process
pipeline, where the worker keeps the state from the plans' diffs.
"""

from __future__ import annotations

import pytest

from modkit import LLM, Pipeline, SamplingParams
from modkit.config import free_component_ports
from modkit.model import embedded_model_dir

PROMPTS = ["Once upon a time", "The cat sat on the", "In the morning we", "A cow says", "Tell me a story"]
# The embedded model in float32 on any device (a GPU pipeline would default to a hub model).
MODEL = {"model": str(embedded_model_dir()), "dtype": "float32"}
# Small enough that four seeded requests at once preempt each other (block_size 4).
CRAMPED = {"num_kv_blocks": 14, "block_size": 4, "max_num_batched_tokens": 24, "max_num_seqs": 4}


def seeded(i: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=0.95, seed=100 + i, max_tokens=24, ignore_eos=True)


def generate(**config: int) -> tuple[list[str], int]:
    llm = LLM(enable_prefix_caching=False, **MODEL, **config)  # type: ignore[arg-type]
    llm.check_invariants_each_step = True
    outs = llm.generate(PROMPTS, [seeded(i) for i in range(len(PROMPTS))], use_tqdm=False)
    return [o.outputs[0].text for o in outs], int(llm.stats()["num_preemptions"])


@pytest.fixture(scope="module")
def unpreempted() -> list[str]:
    texts, preemptions = generate(num_kv_blocks=256)
    assert preemptions == 0
    return texts


def test_a_preempted_seeded_request_samples_what_it_would_have_unpreempted(unpreempted: list[str]) -> None:
    texts, preemptions = generate(**CRAMPED)
    assert preemptions > 0, "the cramped cache should preempt"
    assert texts == unpreempted
    assert len(set(texts)) == len(texts), "different seeds sample different texts"


@pytest.mark.slow
def test_the_pipeline_samples_a_resumed_seeded_request_as_in_process(unpreempted: list[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    ports = free_component_ports()
    with Pipeline.launch(enable_prefix_caching=False, progress=False, **MODEL, **CRAMPED, **ports) as p:  # type: ignore[arg-type]
        client = p.client(timeout=120)
        served = client.models.list().data[0].id

        def complete(i: int) -> str:
            params = seeded(i)
            reply = client.completions.create(
                model=served,
                prompt=PROMPTS[i],
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                max_tokens=params.max_tokens,
                extra_body={"ignore_eos": True},
            )
            return reply.choices[0].text

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            texts = list(pool.map(complete, range(len(PROMPTS))))
        preemptions = p.stats()["scheduler"]["workers"][0]["num_preemptions"]
    assert preemptions > 0, "the cramped cache should preempt"
    assert texts == unpreempted
