"""The event stream: what each pipeline component publishes about its own decisions.

These are the messages of the pipeline's *observation* plane. The data plane
(``modkit.protocol``) moves requests and tokens; this one tells anyone who subscribes
why the batch of each step looks as it does, where each KV block went, and when each
token left. Nothing in the pipeline reads them back: a view that subscribes late, or
not at all, changes nothing.

Each publisher numbers its messages per topic (``modkit.transport.pubsub``), so a
subscriber can tell a dropped message from a quiet component.

=====================  =========================  =====================================================
topic                  publisher (socket)         message
=====================  =========================  =====================================================
``step.<worker>``      scheduler (scheduler.ev)   ``StepEvent``: one per step of that worker
``queued.<worker>``    scheduler (scheduler.ev)   ``Queued``: a request reached that worker's scheduler
``forward.<worker>``   worker-i (worker-i.ev)     ``ForwardEvent``: the worker's own timing of the step
``blocks.<worker>``    KV manager (kv.events)     ``BlockEvents``: block activity of one ``apply`` call
``route``              router (router.ev)         ``Routed``: the worker chosen for a request, and why
``swap.<component>``    any swappable component    ``Swapped``: another implementation took over, or was rolled back
                       (workers: attention)
``request``            frontend (frontend.ev)     ``RequestArrived``, ``TokensOut``, ``RequestDone``
``hello.<component>``  every one of them          ``Hello``: the answer to ``announce_events`` (below)
=====================  =========================  =====================================================

ZeroMQ drops what a PUB socket sends before a subscriber's subscription has reached it
(the "slow joiner"). So a subscriber asks each publisher, over RPC, to ``announce_events``
with a token of its choosing, and counts itself subscribed once that ``Hello`` came back.
The KV manager's ``kv.events`` also carries vLLM-format events on ``worker.<i>`` (for the
router); subscribers of this stream do not subscribe to those.
"""

from __future__ import annotations

import itertools
import threading
from typing import TYPE_CHECKING

import msgspec

from modkit.sampling_params import SamplingParams
from modkit.transport import Publisher

if TYPE_CHECKING:
    from modkit.scheduler.output import StepRecord

# What a subscriber of the whole stream asks for.
TOPICS = ("step.", "queued.", "forward.", "transfer.", "blocks.", "request", "route", "swap", "hello")


class ScheduledReq(msgspec.Struct, array_like=True, frozen=True):
    """One request's share of one step."""

    req_id: str
    num_tokens: int  # tokens computed for it this step
    kind: str  # "decode" (its newest token) or "prompt" (a prefill chunk: of the prompt, or a recompute)
    num_computed_tokens: int  # before this step
    num_cached_tokens: int  # prefix-cache hit skipped when it was admitted this step (else 0)


class StepEvent(msgspec.Struct, tag="step", frozen=True):
    """The scheduler's account of one step of one worker, sent when the step's result came back."""

    worker_id: int
    step: int
    started: float  # time.time() when the plan left for the worker
    step_s: float  # plan sent -> result back (forward, sampling and both hops)
    schedule_s: float  # schedule() in the scheduler, with its KV cache manager calls
    forward_s: float  # the worker's forward, as the worker reported it
    sample_s: float
    scheduled: list[ScheduledReq]  # in batch order
    preempted: dict[str, str]  # req_id -> why it lost its blocks this step
    # req_id -> why it was not scheduled, for the first in line (modkit.scheduler.output.MAX_WAITING_REASONS)
    waiting: dict[str, str]
    num_waiting: int  # in the waiting queue after this step's admissions
    num_running: int  # after this step's admissions and preemptions
    token_budget: int  # max_num_batched_tokens
    tokens_used: int
    kv_usage: float  # fraction of the worker's blocks held by requests, after scheduling
    prefix_cache_queries: int  # tokens of the requests admitted this step (with outputs, for a re-admission)
    prefix_cache_hits: int  # of those, found in the prefix cache (as vllm:prefix_cache_queries/hits)
    failed: str | None = None  # the worker's error, if the step raised
    # Defaulted, so that a trace saved without them still loads (0.0: not measured).
    kv_s: float = 0.0  # of schedule_s, waiting for the KV cache manager's replies (round trips)
    update_s: float = 0.0  # update_from_output() in the scheduler, after the result came back


def step_event(
    record: StepRecord,
    *,
    worker_id: int,
    started: float,
    step_s: float,
    schedule_s: float,
    forward_s: float,
    sample_s: float,
    failed: str | None = None,
    kv_s: float = 0.0,
    update_s: float = 0.0,
) -> StepEvent:
    """The ``StepEvent`` of a scheduler's ``StepRecord``, with the step's timings: what the
    scheduler process publishes, and what a simulation (``modkit.sim``) records."""
    from modkit.scheduler.output import MAX_WAITING_REASONS

    return StepEvent(
        worker_id=worker_id,
        step=record.step,
        started=started,
        step_s=step_s,
        schedule_s=schedule_s,
        forward_s=forward_s,
        sample_s=sample_s,
        scheduled=[
            ScheduledReq(e.req_id, e.num_tokens, e.kind, e.num_computed_tokens, e.num_cached_tokens)
            for e in record.scheduled
        ],
        preempted=record.preempted,
        waiting=dict(itertools.islice(record.waiting.items(), MAX_WAITING_REASONS)),
        num_waiting=record.num_waiting,
        num_running=record.num_running,
        token_budget=record.token_budget,
        tokens_used=record.tokens_used,
        kv_usage=record.kv_usage,
        prefix_cache_queries=record.prefix_cache_queries,
        prefix_cache_hits=record.prefix_cache_hits,
        failed=failed,
        kv_s=kv_s,
        update_s=update_s,
    )


class TransferEvent(msgspec.Struct, tag="transfer", frozen=True):
    """A request's KV blocks moved from a prefill worker to a decode worker (modkit.kvtransfer).

    Published by the decode worker, which read them: ``failed`` says why a read failed, and
    then the decode worker computed those tokens itself (nothing moved, ``num_bytes`` is 0).
    """

    req_id: str
    src_worker_id: int
    dst_worker_id: int
    first_block: int  # the blocks before it the decode worker already cached (a prefix hit)
    num_blocks: int
    num_bytes: int
    started: float  # time.time()
    ended: float
    failed: str | None = None


class ForwardEvent(msgspec.Struct, tag="forward", frozen=True):
    """A worker's own timing of one step (what the model did, measured where it ran)."""

    worker_id: int
    step: int
    started: float  # time.time() when the plan arrived
    forward_s: float  # input preparation and the model forward
    sample_s: float  # sampling, with the copy of sampled ids to the host
    num_tokens: int  # tokens computed (prompt chunks and decodes)
    num_seqs: int  # requests in the batch
    num_sampled: int  # of those, requests that produced a token (not mid-prompt)
    failed: str | None = None
    # Of the sampled, rows the grammar stage constrained (structured outputs); defaulted, so that
    # a trace saved without it still loads.
    num_constrained: int = 0
    # The threads the forward ran on (a CPU worker's small steps run on one:
    # PipelineConfig.cpu_parallel_min_tokens); 0: not recorded (a trace saved before it).
    num_threads: int = 0


class BlockActivity(msgspec.Struct, array_like=True, frozen=True):
    """Blocks that changed, in the order it happened.

    ``kind``: "allocated" (new blocks for ``req_id``), "hit" (cached blocks ``req_id``
    takes without computing them), "cached" (its full blocks become findable by hash),
    "freed" (it let them go; last block first), "evicted" (a free cached block lost its
    hash to make room for ``req_id``), "cleared" (the whole prefix cache was reset).
    """

    kind: str
    req_id: str | None
    block_ids: list[int]


class BlockEvents(msgspec.Struct, tag="blocks", frozen=True):
    """What one KV cache manager call did to one worker's pool."""

    worker_id: int
    ts: float  # time.time()
    activity: list[BlockActivity]
    num_free_blocks: int  # after it
    usage: float


class RequestArrived(msgspec.Struct, tag="arrived", frozen=True):
    """The frontend sent an engine request on (one per completion of an OpenAI request)."""

    ts: float
    req_id: str  # the engine request
    request_id: str  # the OpenAI request it belongs to
    num_prompt_tokens: int
    max_tokens: int | None
    # What a replay needs (modkit.sim.workload_from_trace). Defaulted, so that a trace saved
    # without them still loads (None: not recorded).
    prompt_token_ids: list[int] | None = None
    sampling_params: SamplingParams | None = None  # this request's own (one of n: n=1, its seed)


class Queued(msgspec.Struct, tag="queued", frozen=True):
    """A request reached its worker's scheduler, which may plan with it from now on.

    From ``RequestArrived`` to this is the hops through the router; from this to the first
    step that schedules it, the wait for a plan (and for room in one)."""

    ts: float
    req_id: str
    worker_id: int


class TokensOut(msgspec.Struct, tag="tokens", frozen=True):
    """Tokens the frontend received from one step: one per request (this engine samples one per step)."""

    ts: float
    counts: dict[str, int]  # req_id -> new tokens


class RequestDone(msgspec.Struct, tag="done", frozen=True):
    """A request ended: "stop", "length", "abort" (the client left), or "rejected" / "error" (see ``message``)."""

    ts: float
    req_id: str
    finish_reason: str
    message: str | None = None  # why the pipeline gave it up, for "rejected" and "error"


class Routed(msgspec.Struct, tag="routed", frozen=True):
    """The router chose a worker for a request (again, if it moved off a worker that died)."""

    ts: float
    req_id: str
    worker_id: int
    policy: str
    num_prompt_blocks: int
    cached_blocks: dict[int, int]  # per live worker: leading prompt blocks it caches (as the router knows)
    active_blocks: dict[int, int]  # per live worker: blocks its running requests hold, before this one


class Swapped(msgspec.Struct, tag="swapped", frozen=True):
    """A component's implementation changed: swapped in, or rolled back after it raised (``error``)."""

    ts: float
    component: str
    implementation: str  # the one in charge from now on
    previous: str
    error: str | None  # set on a rollback: why the previous one was taken out


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """The answer to ``announce_events(token)``: the asker is subscribed to this publisher."""

    component: str
    token: str


PipelineEvent = (
    StepEvent
    | ForwardEvent
    | TransferEvent
    | BlockEvents
    | RequestArrived
    | Queued
    | TokensOut
    | RequestDone
    | Routed
    | Swapped
    | Hello
)


class EventPublisher:
    """A component's side of the stream: a ``Publisher`` that any of its threads may use.

    The lock is uncontended in every component but the frontend, whose event loop
    publishes while its serve loop answers ``announce_events``.
    """

    def __init__(self, component: str, address: str, allow_remote: bool = False) -> None:
        self.component = component
        self.publisher = Publisher(address, allow_remote=allow_remote)
        self._lock = threading.Lock()

    def publish(self, topic: str, event: object) -> None:
        """Send ``event`` on ``topic``: a ``PipelineEvent``, or anything else the codec encodes
        (the KV cache manager sends vLLM-format events on its ``worker.<i>`` topics)."""
        with self._lock:
            self.publisher.publish(topic, event)

    def wants(self, topic: str) -> bool:
        """Whether anyone subscribes to ``topic`` now: if not, an event for it need not even be built."""
        with self._lock:
            return self.publisher.wants(topic)

    def announce(self, token: str) -> None:
        self.publish(f"hello.{self.component}", Hello(self.component, token))

    def close(self) -> None:
        with self._lock:
            self.publisher.close()
