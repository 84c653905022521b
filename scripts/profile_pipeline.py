#!/usr/bin/env python
"""Where each pipeline process spends its time: summaries of the profiles ``MODKIT_PROFILE_DIR`` leaves.

    MODKIT_PROFILE_DIR=results/prof python scripts/benchmark.py --engines pipeline ...
    python scripts/profile_pipeline.py results/prof                # a table per process

With ``MODKIT_PROFILE_DIR`` set, every component's serve loop (scheduler, workers, router,
KV cache manager, sampler) runs under ``cProfile`` and writes ``<Class>-<pid>.prof`` when the
pipeline stops. For each file this prints the loop's total time, split into waiting for
messages (idle), waiting for the replies of its RPC calls (the scheduler's calls to the KV
cache manager) and working, and the functions with the most time of their own.
"""

from __future__ import annotations

import argparse
import pstats
from pathlib import Path


def summarise(path: Path, top: int) -> None:
    stats = pstats.Stats(str(path))
    rows = stats.stats  # type: ignore[attr-defined]  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total = max(ct for _, _, _, ct, _ in rows.values())
    # Waiting for messages is the serve loop's own poll; a poll under an RPC call is waiting for a reply.
    idle = waits = 0.0
    for (file, _, name), (_, _, _, _, callers) in rows.items():
        if name == "poll" and "zmq" in file:
            for (_, _, caller), (_, _, tottime, _) in callers.items():
                if caller == "_serve":
                    idle += tottime
                else:
                    waits += tottime
    print(
        f"\n== {path.name}: {total:.2f} s in the serve loop: {idle:.2f} s idle (waiting for messages), "
        f"{waits:.2f} s waiting for RPC replies, {total - idle - waits:.2f} s working"
    )
    print(f"{'own s':>8} {'cum s':>8} {'calls':>9}  function")
    ranked = sorted(rows.items(), key=lambda item: item[1][2], reverse=True)
    for (file, line, name), (_, calls, tottime, cumtime, _) in ranked[:top]:
        where = f"{Path(file).name}:{line}" if line else file
        print(f"{tottime:>8.3f} {cumtime:>8.3f} {calls:>9}  {name} ({where})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    files = sorted(Path(args.directory).glob("*.prof"))
    if not files:
        raise SystemExit(f"no .prof files in {args.directory}: was MODKIT_PROFILE_DIR set when the pipeline ran?")
    for path in files:
        summarise(path, args.top)


if __name__ == "__main__":
    main()
