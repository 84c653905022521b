#!/usr/bin/env python
"""Where one decode step's time goes: the host's phases, and the GPU's busy time.

    python scripts/profile_step.py --model-shape qwen2.5-0.5b --batch 256 --context 320   # a GPU
    python scripts/profile_step.py                                                        # embedded model, CPU

Fills the engine with ``--batch`` requests of ``--context`` prompt tokens, runs their
prompts, then times decode steps three ways:

1. **free-running**: ``LLM``'s own loop (``LLM.steps``), nothing added: the step time a
   user gets (planning and, on a GPU, launching step N+1 and detokenizing step N-1 while the
   device runs step N); the same loop planning step N+1 ahead but launching it only once
   step N's tokens are on the host; without async scheduling (only the detokenizing
   overlaps); and without any overlap. The four are alternated, three runs of each.
2. **phase by phase**: the same step cut into schedule / worker (inputs and forward) / sample /
   scheduler update / output processing, with a device synchronisation after each phase,
   so each phase's device work is charged to it. (The syncs add a little.)
3. **GPU busy time** (CUDA only): ``torch.profiler`` over a few steps; the sum of kernel
   times per step. Step time minus GPU busy time is time the GPU sat idle waiting for the host.

Prints a table and saves JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from modkit import LLM, SamplingParams
from modkit.checks import RANDOM_MODEL_SHAPES, make_random_checkpoint
from modkit.model import embedded_model_dir
from modkit.scheduler import ModelRunnerOutput


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fill(llm: LLM, args: argparse.Namespace) -> dict[str, float]:
    """Add the batch and run until every request is decoding; the median prompt step's milliseconds
    (eager: steps with a prompt chunk replay no CUDA graph), host launch and whole step."""
    vocab = llm.engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    # Long enough that the first requests still decode when the last prompt is in.
    prefill_steps = -(-args.batch * args.context // llm.config.max_num_batched_tokens)
    max_tokens = prefill_steps + args.warmup_steps + (3 * len(MODES) + 4) * args.steps + 64
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for _ in range(args.batch):
        ids = torch.randint(0, vocab, (args.context,), generator=gen).tolist()
        llm._add({"prompt_token_ids": ids}, params, 0, [])  # queued as generate() would, not yet run
    core, sched = llm.engine, llm.engine.scheduler
    launch_ms, step_ms = [], []
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        sync(core.device)
        start = time.perf_counter()
        pending = core.launch_step()  # schedule, inputs, forward and sampling queued
        launched = time.perf_counter()
        llm.processor.process(core.finish_step(pending))
        sync(core.device)
        launch_ms.append(1e3 * (launched - start))
        step_ms.append(1e3 * (time.perf_counter() - start))
    for _ in range(args.warmup_steps):
        llm.processor.process(llm.engine.step())
    assert len(sched.running) == args.batch, f"only {len(sched.running)} of {args.batch} requests fit"
    return {"host launch": statistics.median(launch_ms), "whole step": statistics.median(step_ms)}


# Each adds to the one before; the last is LLM's default on a GPU.
MODES = ("no overlap", "detokenize overlapped", "planned ahead", "launched ahead")


def free_running(llm: LLM, steps: int, mode: str) -> float:
    """Seconds per step of LLM's own loop (``LLM.steps``) in one of the MODES."""
    device = llm.engine.device
    llm.overlap_steps = mode != MODES[0]
    llm.engine.async_scheduling = mode in MODES[2:]
    llm.engine.launch_ahead = mode == MODES[3]
    sync(device)
    start = time.perf_counter()
    for _, _ in zip(range(steps), llm.steps(), strict=False):
        pass
    sync(device)
    return (time.perf_counter() - start) / steps


def phase_by_phase(llm: LLM, steps: int) -> dict[str, float]:
    """Median milliseconds of each phase, a sync closing each."""
    core, device = llm.engine, llm.engine.device
    times: dict[str, list[float]] = {}

    def mark(name: str, start: float) -> float:
        sync(device)
        now = time.perf_counter()
        times.setdefault(name, []).append(1e3 * (now - start))
        return now

    for _ in range(steps):
        t = time.perf_counter()
        so = core.scheduler.schedule()
        t = mark("schedule", t)
        result = core.worker.execute_model(so)
        t = mark("worker: inputs + forward", t)
        states = [core.executor.states[r] for r in result.req_ids]
        sampled = core.sampler.sample(result.logits, states).to_lists()
        t = mark("sample (+ one copy to host)", t)
        out = ModelRunnerOutput(result.req_ids, [s.token_id for s in sampled], [s.logprobs for s in sampled])
        outputs = core.scheduler.update_from_output(so, out)
        t = mark("scheduler update", t)
        llm.processor.process(outputs)
        mark("output processing (detokenize)", t)
    return {name: statistics.median(v) for name, v in times.items()}


def gpu_busy(llm: LLM, steps: int) -> tuple[float, dict[str, float]]:
    """Milliseconds of kernel time per step, from torch.profiler, and the ten costliest kernels' share of it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            llm.processor.process(llm.engine.step())
        sync(llm.engine.device)
    by_kernel: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.device_time_total > 0:
            by_kernel[e.name] = by_kernel.get(e.name, 0.0) + e.device_time_total / 1e3 / steps
    top = dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])[:10])
    return sum(by_kernel.values()), top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model folder (default: the embedded model)")
    parser.add_argument("--model-shape", choices=sorted(RANDOM_MODEL_SHAPES), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=64, help="prompt tokens per request")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--cuda-graphs", choices=("on", "off"), default="on")
    parser.add_argument("--out", default="results/profile_step.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else embedded_model_dir()
        if args.model_shape:
            model_dir = make_random_checkpoint(args.model_shape, Path(tmp) / args.model_shape)
        llm = LLM(
            model_dir,
            device=args.device,
            dtype=args.dtype,
            max_num_seqs=args.batch,
            max_num_batched_tokens=max(2048, args.context),
            attention_backend=args.attention_backend,
            enforce_eager=args.cuda_graphs == "off",
        )
        prompt_steps = fill(llm, args)
        # Alternated, three of each, so drift (longer contexts, a busy host) hits all alike.
        runs: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(3):
            for mode in MODES:
                runs[mode].append(1e3 * free_running(llm, args.steps, mode))
        plain_ms, detok_ms, planned_ms, step_ms = (statistics.median(runs[mode]) for mode in MODES)
        phases = phase_by_phase(llm, args.steps)
        busy, kernels = gpu_busy(llm, 5) if llm.engine.device.type == "cuda" else (None, {})

    core = llm.engine
    result: dict[str, Any] = {
        "machine": platform.node(),
        "device": torch.cuda.get_device_name() if core.device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": args.model_shape or str(model_dir.name),
        "dtype": str(core.dtype),
        "attention_backend": core.model.attention_backend.name,
        "cuda_graphs": core.worker.runner.graphs is not None,
        "batch": args.batch,
        "context": args.context,
        "step_ms": step_ms,
        "step_ms_no_overlap": plain_ms,
        "step_ms_detokenize_overlapped": detok_ms,
        "step_ms_planned_ahead": planned_ms,
        "runs_ms": runs,
        "output_tok_s": args.batch / step_ms * 1e3,
        "phases_ms": phases,
        "prompt_step_ms": prompt_steps,
        "gpu_busy_ms": busy,
        "gpu_kernels_ms": kernels,
    }
    print(
        f"\n{result['device']}, {result['model']}, {result['dtype']}, attention {result['attention_backend']}, "
        f"CUDA graphs {'on' if result['cuda_graphs'] else 'off'}; {args.batch} decodes over ~{args.context} tokens"
    )
    print(f"{'phase (synced)':<34}{'ms':>9}")
    for name, ms in phases.items():
        print(f"{name:<34}{ms:>9.2f}")
    print(f"{'sum of phases':<34}{sum(phases.values()):>9.2f}")
    label = f"prompt step ({llm.config.max_num_batched_tokens} tok), launch"
    print(f"{label:<34}{prompt_steps['host launch']:>9.2f}")
    print(f"{'prompt step, whole (synced)':<34}{prompt_steps['whole step']:>9.2f}")
    for label, ms in (
        ("free-running step, no overlap", plain_ms),
        ("  + detokenize overlapped", detok_ms),
        ("  + next step planned ahead", planned_ms),
        ("  + and launched ahead (LLM.steps)", step_ms),
    ):
        print(f"{label:<34}{ms:>9.2f}   ({args.batch / ms * 1e3:,.0f} output tok/s)")
    if busy is not None:
        idle = 100 * (1 - busy / step_ms)
        print(f"{'GPU busy per step (profiler)':<34}{busy:>9.2f}   (GPU idle {idle:.0f}% of the step)")
        for name, ms in kernels.items():
            print(f"  {ms:>7.3f} ms  {name[:90]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
