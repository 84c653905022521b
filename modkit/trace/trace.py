"""``Trace``: a recorded event stream, as pandas DataFrames, saved to and loaded from a file.

::

    trace = pipeline.trace()             # what the recorder kept since launch (or clear_trace)
    trace.steps                          # one row per step of each worker
    trace.scheduled                      # one row per request per step: what it got, or why it lost its blocks
    trace.requests                       # one row per request: arrival, queueing, TTFT, finish
    trace.tokens                         # one row per token batch the frontend received (for inter-token latency)
    trace.blocks                         # one row per block per KV cache manager action
    trace.forwards                       # the workers' own timings
    trace.transfers                      # one row per KV transfer, prefill worker -> decode worker
    trace.routes                         # one row per routing decision: the worker, and what each worker offered
    trace.block_state(worker_id=0, at=2.5)  # every block's owners and cache state at t = 2.5 s
    trace.summary()                      # throughput, TTFT and ITL percentiles, preemptions, prefix hits
    trace.save("run.json.gz"); Trace.load("run.json.gz")

Times are seconds since ``meta["t0"]`` (the launch, or the recorder's last ``clear``),
in one column named ``t`` (or ``start``/``end`` for steps), so frames line up on one axis.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from modkit.trace.events import (
    BlockEvents,
    ForwardEvent,
    PipelineEvent,
    Queued,
    RequestArrived,
    RequestDone,
    Routed,
    StepEvent,
    Swapped,
    TokensOut,
    TransferEvent,
)
from modkit.trace.summary import TraceSummary, summarize

if TYPE_CHECKING:  # pandas loads only when a frame is asked for
    import pandas as pd

E = TypeVar("E")

FORMAT = "modkit-trace"
VERSION = 1


class _TraceFile(msgspec.Struct):
    format: str
    version: int
    meta: dict[str, Any]
    events: list[PipelineEvent]


@dataclass(slots=True)
class BlockState:
    """One worker's pool at one moment, rebuilt from the block events up to it.

    Block 0 is the reserved null block and never changes. A block is *free* with no
    owner; *cached* while its hash finds it (held or free); *shared* with two owners or
    more (a prefix hit on a block someone else holds).
    """

    owners: list[list[str]]  # per block: the requests that hold it, in the order they took it
    cached: list[bool]  # per block: findable by hash

    @property
    def num_blocks(self) -> int:
        return len(self.owners)

    def counts(self) -> dict[str, int]:
        """How many blocks are held, shared, cached-but-free and free (block 0 not counted)."""
        held = sum(1 for o in self.owners[1:] if o)
        return {
            "held": held,
            "shared": sum(1 for o in self.owners[1:] if len(o) > 1),
            "cached_free": sum(1 for o, c in zip(self.owners[1:], self.cached[1:], strict=True) if not o and c),
            "free": self.num_blocks - 1 - held,
        }

    def apply(self, kind: str, req_id: str | None, block_ids: list[int]) -> None:
        if kind in ("allocated", "hit"):
            for b in block_ids:
                self.owners[b].append(req_id or "?")
                if kind == "allocated":
                    self.cached[b] = False
        elif kind == "freed":
            for b in block_ids:
                if req_id in self.owners[b]:
                    self.owners[b].remove(req_id)
        elif kind == "cached":
            for b in block_ids:
                self.cached[b] = True
        elif kind == "evicted":
            for b in block_ids:
                self.cached[b] = False
        elif kind == "cleared":
            self.cached = [False] * len(self.cached)


class Trace:
    """Events of one recording and what is known of the pipeline that made them (``meta``)."""

    def __init__(self, events: list[PipelineEvent], meta: dict[str, Any] | None = None) -> None:
        self.events = events
        self.meta = dict(meta or {})
        if "t0" not in self.meta:
            self.meta["t0"] = min((event_time(e) for e in events), default=0.0)
        self.t0: float = self.meta["t0"]

    def __len__(self) -> int:
        return len(self.events)

    def __repr__(self) -> str:
        return f"Trace({len(self.events)} events, {len(self.requests)} requests, {len(self.steps)} steps)"

    # -- files ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the trace as JSON (gzipped if the name ends in .gz); returns the path."""
        path = Path(path)
        data = msgspec.json.encode(_TraceFile(FORMAT, VERSION, self.meta, self.events))
        path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """A trace ``save`` wrote; ValueError if the file is something else."""
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        try:
            file = msgspec.json.decode(raw, type=_TraceFile)
        except msgspec.DecodeError as error:
            raise ValueError(f"{path} is not a modkit trace: {error}") from None
        if file.format != FORMAT or file.version != VERSION:
            raise ValueError(f"{path} is {file.format!r} version {file.version}, not {FORMAT!r} version {VERSION}")
        return cls(file.events, file.meta)

    # -- frames --------------------------------------------------------------------------

    def _of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]

    @cached_property
    def steps(self) -> pd.DataFrame:
        """One row per step: its batch (prompt and decode tokens against the budget), queues, KV usage, timings."""
        rows = []
        for e in self._of(StepEvent):
            prompt = sum(s.num_tokens for s in e.scheduled if s.kind == "prompt")
            rows.append(
                {
                    "worker_id": e.worker_id,
                    "step": e.step,
                    "start": e.started - self.t0,
                    "end": e.started + e.step_s - self.t0,
                    "num_seqs": len(e.scheduled),
                    "num_prompt_tokens": prompt,
                    "num_decode_tokens": e.tokens_used - prompt,
                    "tokens_used": e.tokens_used,
                    "token_budget": e.token_budget,
                    "num_running": e.num_running,
                    "num_waiting": e.num_waiting,
                    "num_preempted": len(e.preempted),
                    "kv_usage": e.kv_usage,
                    "prefix_cache_queries": e.prefix_cache_queries,
                    "prefix_cache_hits": e.prefix_cache_hits,
                    "step_s": e.step_s,
                    "schedule_s": e.schedule_s,
                    "forward_s": e.forward_s,
                    "sample_s": e.sample_s,
                    "kv_s": e.kv_s,
                    "update_s": e.update_s,
                    "failed": e.failed,
                }
            )
        return _frame(rows, ["worker_id", "step", "start", "end", "tokens_used", "token_budget", "kv_usage"])

    @cached_property
    def scheduled(self) -> pd.DataFrame:
        """One row per request per step: "prompt" (a chunk), "decode", or "preempted" (with the reason)."""
        rows = []
        for e in self._of(StepEvent):
            start, end = e.started - self.t0, e.started + e.step_s - self.t0
            for s in e.scheduled:
                rows.append(
                    {
                        "worker_id": e.worker_id,
                        "step": e.step,
                        "start": start,
                        "end": end,
                        "req_id": s.req_id,
                        "kind": s.kind,
                        "num_tokens": s.num_tokens,
                        "num_computed_tokens": s.num_computed_tokens,
                        "num_cached_tokens": s.num_cached_tokens,
                        "reason": None,
                    }
                )
            for req_id, reason in e.preempted.items():
                rows.append(
                    {"worker_id": e.worker_id, "step": e.step, "start": start, "end": end, "req_id": req_id}
                    | {"kind": "preempted", "num_tokens": 0, "num_computed_tokens": 0, "num_cached_tokens": 0}
                    | {"reason": reason}
                )
        return _frame(rows, ["worker_id", "step", "start", "end", "req_id", "kind", "num_tokens"])

    @cached_property
    def tokens(self) -> pd.DataFrame:
        """One row per request per output message: when its tokens reached the frontend, and the gap since the last."""
        import pandas as pd

        rows = [
            {"req_id": req_id, "t": e.ts - self.t0, "num_tokens": n}
            for e in self._of(TokensOut)
            for req_id, n in e.counts.items()
            if n > 0
        ]
        frame = _frame(rows, ["req_id", "t", "num_tokens"])
        frame["itl"] = frame.groupby("req_id")["t"].diff() if len(frame) else pd.Series(dtype=float)
        return frame

    @cached_property
    def requests(self) -> pd.DataFrame:
        """One row per engine request: when it arrived, reached its scheduler (``queued``), was first
        scheduled, sent its first token, finished."""
        info: dict[str, dict[str, Any]] = {}

        def row(req_id: str) -> dict[str, Any]:
            return info.setdefault(req_id, {"req_id": req_id, "num_preemptions": 0, "num_cached_tokens": 0})

        for e in self.events:
            if isinstance(e, RequestArrived):
                r = row(e.req_id)
                r.update(request_id=e.request_id, arrival=e.ts - self.t0, num_prompt_tokens=e.num_prompt_tokens)
            elif isinstance(e, StepEvent):
                for s in e.scheduled:
                    r = row(s.req_id)
                    r["worker_id"] = e.worker_id
                    if "first_scheduled" not in r:  # its first admission (a re-admission may hit its own blocks)
                        r["first_scheduled"] = e.started - self.t0
                        r["num_cached_tokens"] = s.num_cached_tokens
                for req_id in e.preempted:
                    row(req_id)["num_preemptions"] += 1
            elif isinstance(e, TokensOut):
                for req_id, n in e.counts.items():
                    r = row(req_id)
                    r.setdefault("first_token", e.ts - self.t0)
                    r["num_output_tokens"] = r.get("num_output_tokens", 0) + n
            elif isinstance(e, Routed):
                row(e.req_id)["worker_id"] = e.worker_id
            elif isinstance(e, Queued):
                row(e.req_id).setdefault("queued", e.ts - self.t0)  # the first time (it may move on a restart)
            elif isinstance(e, RequestDone):
                r = row(e.req_id)
                r.update(finished=e.ts - self.t0, finish_reason=e.finish_reason)
        columns = [
            "req_id",
            "request_id",
            "worker_id",
            "arrival",
            "queued",
            "first_scheduled",
            "first_token",
            "finished",
        ]
        columns += ["num_prompt_tokens", "num_output_tokens", "num_cached_tokens", "num_preemptions", "finish_reason"]
        frame = _frame(list(info.values()), columns).reindex(columns=columns)
        frame["queue_time"] = frame["first_scheduled"] - frame["arrival"]
        frame["ttft"] = frame["first_token"] - frame["arrival"]
        frame["e2e"] = frame["finished"] - frame["arrival"]
        return frame

    @cached_property
    def blocks(self) -> pd.DataFrame:
        """One row per block each KV cache manager action touched, in order (``seq`` numbers the actions)."""
        rows: list[dict[str, Any]] = []
        seq = 0
        for e in self._of(BlockEvents):
            for a in e.activity:
                rows.extend(
                    {"seq": seq, "t": e.ts - self.t0, "worker_id": e.worker_id, "kind": a.kind}
                    | {"req_id": a.req_id, "block_id": b}
                    for b in a.block_ids
                )
                seq += 1
        return _frame(rows, ["seq", "t", "worker_id", "kind", "req_id", "block_id"])

    @cached_property
    def forwards(self) -> pd.DataFrame:
        """The workers' own timing of each step."""
        rows = [
            {
                "worker_id": e.worker_id,
                "step": e.step,
                "start": e.started - self.t0,
                "forward_s": e.forward_s,
                "sample_s": e.sample_s,
                "num_tokens": e.num_tokens,
                "num_seqs": e.num_seqs,
                "num_sampled": e.num_sampled,
                "num_constrained": e.num_constrained,  # rows the grammar stage masked (structured outputs)
                "failed": e.failed,
            }
            for e in self._of(ForwardEvent)
        ]
        return _frame(rows, ["worker_id", "step", "start", "forward_s", "num_tokens"])

    @cached_property
    def transfers(self) -> pd.DataFrame:
        """One row per KV transfer (disaggregated prefill and decode): which request's blocks moved
        from which prefill worker to which decode worker, how many, how many bytes, when, and how
        fast (``gb_per_s``); ``failed`` says why a read failed (the decode worker recomputed)."""
        rows = [
            {
                "req_id": e.req_id,
                "src_worker_id": e.src_worker_id,
                "dst_worker_id": e.dst_worker_id,
                "first_block": e.first_block,
                "num_blocks": e.num_blocks,
                "num_bytes": e.num_bytes,
                "start": e.started - self.t0,
                "end": e.ended - self.t0,
                "transfer_s": e.ended - e.started,
                "gb_per_s": e.num_bytes / max(e.ended - e.started, 1e-9) / 1e9,
                "failed": e.failed,
            }
            for e in self._of(TransferEvent)
        ]
        columns = ["req_id", "src_worker_id", "dst_worker_id", "first_block", "num_blocks", "num_bytes"]
        return _frame(rows, [*columns, "start", "end", "transfer_s", "gb_per_s", "failed"])

    @cached_property
    def routes(self) -> pd.DataFrame:
        """One row per routing decision: the worker chosen, and for each live worker ``w`` the
        prompt blocks it caches (``cached_<w>``) and the blocks its running requests hold (``active_<w>``)."""
        rows = []
        for e in self._of(Routed):
            row: dict[str, Any] = {"t": e.ts - self.t0, "req_id": e.req_id, "worker_id": e.worker_id}
            row |= {"policy": e.policy, "num_prompt_blocks": e.num_prompt_blocks}
            row |= {f"cached_{w}": n for w, n in sorted(e.cached_blocks.items())}
            row |= {f"active_{w}": n for w, n in sorted(e.active_blocks.items())}
            rows.append(row)
        return _frame(rows, ["t", "req_id", "worker_id", "policy", "num_prompt_blocks"])

    @cached_property
    def swaps(self) -> pd.DataFrame:
        """One row per implementation change: swapped in, or rolled back (``error`` set)."""
        rows = [
            {"t": e.ts - self.t0, "component": e.component, "implementation": e.implementation}
            | {"previous": e.previous, "error": e.error}
            for e in self._of(Swapped)
        ]
        return _frame(rows, ["t", "component", "implementation", "previous", "error"])

    # -- the KV pool at one moment --------------------------------------------------------

    def num_blocks(self, worker_id: int = 0) -> int:
        """Blocks in the worker's pool (from ``meta``, else the highest block id seen, plus one)."""
        known = self.meta.get("num_blocks")
        if known is not None and worker_id < len(known):
            return int(known[worker_id])
        ids = [b for e in self._of(BlockEvents) if e.worker_id == worker_id for a in e.activity for b in a.block_ids]
        return max(ids, default=0) + 1

    def block_state(self, worker_id: int = 0, at: float | None = None) -> BlockState:
        """The worker's pool after every block event up to ``at`` seconds (None: the end of the trace)."""
        n = self.num_blocks(worker_id)
        state = BlockState([[] for _ in range(n)], [False] * n)
        for e in self._of(BlockEvents):
            if e.worker_id != worker_id:
                continue
            if at is not None and e.ts - self.t0 > at:
                break
            for a in e.activity:
                state.apply(a.kind, a.req_id, a.block_ids)
        return state

    def prefix_hit_rate(self) -> float:
        """Prefix-cache hits over queries, in tokens, over the whole trace (0.0 with no query)."""
        steps = self.steps
        queries = int(steps["prefix_cache_queries"].sum()) if len(steps) else 0
        return int(steps["prefix_cache_hits"].sum()) / queries if queries else 0.0

    def summary(self) -> TraceSummary:
        """Output throughput, TTFT and inter-token latency (p50, p99), preemptions, prefix-hit rate."""
        return summarize(self)


def event_time(event: PipelineEvent) -> float:
    """When the event happened (``time.time()``): its ``ts``, or when its step started."""
    for name in ("ts", "started"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return float("inf")


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """A DataFrame of ``rows``; with no rows, an empty one that still has the ``columns`` asked for."""
    import pandas as pd

    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)
