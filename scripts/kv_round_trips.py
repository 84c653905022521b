"""How many round trips the scheduler makes to the KV cache manager process for a workload.

    python scripts/kv_round_trips.py                       # 1,024 requests x 256 in / 128 out
    python scripts/kv_round_trips.py --num-kv-blocks 2048  # a cache that forces preemptions

The scheduler alone, with no model: modkit's ``Scheduler`` over a ``KVCacheManagerClient``
talking to a ``KVCacheService`` in its own process (as in the pipeline), stepped in turn
(schedule, then update with a made-up token for each request that samples), or with
``--plan-ahead`` two steps in flight, as the pipeline's async scheduling keeps them. Prints the steps,
the round trips and what the client batched, as JSON, so two versions of the code can be
compared on the same workload.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from modkit.kvcache.client import KVCacheManagerClient
from modkit.request import Request
from modkit.sampling_params import SamplingParams
from modkit.scheduler import ModelRunnerOutput, Scheduler, SchedulerOutput
from modkit.transport import ComponentProcess, ipc_address


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=1024)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=32768)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan-ahead", action="store_true", help="plan step N+1 before step N's tokens are back")
    args = parser.parse_args()

    service = ComponentProcess.start(
        "kv-round-trips",
        "modkit.kvcache.service:KVCacheService",
        {"num_blocks": [args.num_kv_blocks], "block_size": args.block_size},
        ipc_address("kv-round-trips.rpc"),
    )
    try:
        with service.client(timeout_s=60) as rpc:
            kv = KVCacheManagerClient(rpc, 0, args.block_size)
            scheduler = Scheduler(kv, args.max_num_batched_tokens, args.max_num_seqs, 1 << 20)
            rng = random.Random(args.seed)
            params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
            for i in range(args.num_prompts):
                prompt = [rng.randrange(1, 30000) for _ in range(args.input_len)]
                scheduler.add_request(Request(f"r{i}", prompt, params))
            started, steps = time.perf_counter(), 0
            in_flight: list[tuple[SchedulerOutput, list[str]]] = []
            while scheduler.has_unfinished_requests() or in_flight:
                while scheduler.has_unfinished_requests() and (
                    not in_flight or (args.plan_ahead and len(in_flight) == 1 and scheduler.can_plan_ahead())
                ):
                    plan = scheduler.schedule()
                    # A request samples once every known token is computed; its token is a placeholder till then.
                    sampled = [
                        r
                        for r in plan.num_scheduled_tokens
                        if (q := scheduler.requests[r]).num_computed_tokens
                        == q.num_tokens + q.num_output_placeholders - 1
                    ]
                    in_flight.append((plan, sampled))
                plan, sampled = in_flight.pop(0)
                scheduler.update_from_output(plan, ModelRunnerOutput(sampled, [7] * len(sampled)))
                steps += 1
            kv.flush()
            result = {
                "num_steps": steps,
                "kv_round_trips": kv.num_round_trips,
                "kv_promised": kv.num_promised,
                "num_preemptions": scheduler.num_preemptions,
                "wall_s": round(time.perf_counter() - started, 2),
            }
            print(json.dumps(result))
    finally:
        service.stop()


if __name__ == "__main__":
    main()
