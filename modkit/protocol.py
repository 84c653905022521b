"""Wire messages: every ``msgspec.Struct`` that crosses from one modkit process to another.

Everything here is encoded with msgpack by ``modkit.transport.codec`` and never with
pickle: a peer can only ever make the receiver build these plain records, not run code.

Each message is a *tagged* Struct: its msgpack map carries ``"type": "<tag>"`` so one
decoder turns a frame back into the right class (``TransportMessage`` below is that
union). Tags are short, stable names; renaming one breaks the wire, renaming the class
does not.

Transport level (used by ``modkit.transport``; components never build these by hand):

==================  =====================================================================
``Call``            client -> server: run ``method(*args, **kwargs)`` on the hosted object
``Reply``           server -> client: the call's result
``ErrorReply``      server -> client: the call raised (or could not be decoded / run)
``Ready``           child -> launcher, once: the object is built and its server is bound
``Heartbeat``       child -> launcher, every interval while its serve loop turns
``ChildSpec``       launcher -> child, once, as JSON on the child's stdin (not a socket)
==================  =====================================================================

Component level: the messages the six pipeline components (frontend, scheduler, workers,
router, KV cache manager, sampler) exchange go *below* the transport section, one block
per component, each a tagged Struct with a comment on every field. Most of them travel
as the arguments and results of RPC calls, which the server converts to the annotated
parameter types of the method it calls; a message that is published (pub/sub) or pushed
needs a tag and a place in a union of its own, built like ``TransportMessage``.

Two more sets of records cross sockets and live with their own plane, not here: the
event stream every component publishes for views and traces (``modkit.trace.events``,
one ``PipelineEvent`` union with its topic table), and the dataclasses a step's messages
carry (``SchedulerOutput`` and ``ModelRunnerOutput`` in ``modkit.scheduler.output``,
``SamplingParams``, ``TokenLogprobs`` in ``modkit.logprobs``, the KV events of
``modkit.kvcache.events``), which msgpack encodes field by field.
"""

from __future__ import annotations

from typing import Any

import msgspec

from modkit.sampling_params import SamplingParams
from modkit.scheduler.output import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput

# Method names the RPC server answers itself, before looking at the hosted object. They
# contain a dot, so they can never clash with a Python method name.
PING = "rpc.ping"  # answers {"pid": ..., "object": <class name>}: proves the serve loop is turning
SHUTDOWN = "rpc.shutdown"  # answers None, then the serve loop ends (the polite first step of a stop)
LOOP = "rpc.loop"  # answers the serve loop's clock: seconds busy and idle (modkit.transport.serve.LoopClock)


# ---------------------------------------------------------------------------------------
# Transport level
# ---------------------------------------------------------------------------------------


class Call(msgspec.Struct, tag="call", frozen=True):
    """Ask the server to run one public method of the object it hosts."""

    req_id: int  # chosen by the client, unique per client socket; the reply carries it back
    method: str  # a public method name (no leading underscore), or PING / SHUTDOWN
    args: list[Any] = []  # msgpack-encodable values: builtins, Structs, dataclasses
    kwargs: dict[str, Any] = {}
    # A signed call (modkit.transport.security) travels as two frames, [Call, HMAC of the
    # first]; these make each signed frame unique, so a copied one cannot be sent again.
    sent_at: float = 0.0  # time.time() of the client; a server refuses one too far from its own clock
    client_id: bytes = b""  # 16 random bytes per client; its req_ids only grow, so a server refuses one seen


class Reply(msgspec.Struct, tag="reply", frozen=True):
    """The result of a ``Call``; the client converts it to the type it expects, if it knows one."""

    req_id: int
    result: Any


class ErrorReply(msgspec.Struct, tag="error", frozen=True):
    """The call raised on the server; the client raises ``RemoteError`` with these fields."""

    req_id: int
    type_name: str  # the exception's class name, e.g. "ValueError"
    message: str  # str(exception)
    traceback: str  # the server-side traceback text, for logs and notebooks


class Ready(msgspec.Struct, tag="ready", frozen=True):
    """Sent once by a child process after its object is built and its RPC server is bound."""

    name: str  # the component name the launcher gave it
    pid: int  # the child's pid, checked against the one the launcher started
    address: str  # the endpoint the RPC server is bound to (the real port if ``:*`` was asked)


class Heartbeat(msgspec.Struct, tag="heartbeat", frozen=True):
    """Sent by a child's serve loop every interval; a stale one means busy or stuck, not dead."""

    name: str
    pid: int
    seq: int  # counts up from 0; the receiver keeps only the newest (CONFLATE)
    # NOTE: time.monotonic() of the sender. CLOCK_MONOTONIC is one clock for the whole host,
    # so the launcher can subtract it from its own; heartbeats never cross machines.
    sent_at: float


class LaunchKeys(msgspec.Struct, frozen=True):
    """The secrets of one launch, held by the launcher and its children only (``modkit.transport.security``)."""

    secret: str  # hex: the HMAC-SHA256 key that signs control calls
    server_public: str  # z85 CURVE keys: every tcp:// socket that binds is a CURVE server with these
    server_secret: str
    client_public: str  # ... and every one that connects, a CURVE client with these (the only one allowed)
    client_secret: str


class ChildSpec(msgspec.Struct, frozen=True):
    """What ``ComponentProcess.start`` tells its child: one JSON line on the child's stdin.

    Not on the command line, which every local user can read in /proc. The pipe stays
    open afterwards: when it closes, the launcher is gone and the child exits.
    """

    name: str  # the component's name, for logs and Ready
    target: str  # "package.module:Name": a class or factory function, called with kwargs
    kwargs: dict[str, Any]  # JSON values; Structs and dataclasses arrive as objects, rebuilt from annotations
    address: str  # where the child binds its RpcServer
    control_address: str  # the launcher's PULL socket, for Ready
    heartbeat_address: str  # the launcher's PULL socket that keeps only the newest Heartbeat
    allowed_methods: list[str] | None  # None: every public method
    allow_remote: bool  # let ``address`` be a non-loopback TCP address
    heartbeat_interval_s: float
    log_level: str  # "INFO", "DEBUG", ...
    http_port: int | None = None  # serve GET /health and /stats here (None: the object serves HTTP itself, or none)
    http_host: str = "127.0.0.1"
    http_api_key: str | None = None  # set: GET /stats asks for "Authorization: Bearer <it>" (/health stays open)
    keys: LaunchKeys | None = None  # the launch's keys; the child makes them its process default


TransportMessage = Call | Reply | ErrorReply | Ready | Heartbeat


# ---------------------------------------------------------------------------------------
# Component level: add each component's messages below, one section per component.
# ---------------------------------------------------------------------------------------

# The pipeline's data plane. Each of these travels on a PUSH -> PULL channel (an ``Inbox``
# in ``modkit.transport``), never as an RPC, so a slow receiver never blocks a sender's
# loop. Engine objects (``SchedulerOutput``, ``ModelRunnerOutput``, ``EngineCoreOutput``,
# ``SamplingParams``) are dataclasses that msgspec encodes field by field: the same
# objects the in-process engine passes, on the wire.
#
#   frontend --AddRequest/AbortRequest--> router --(worker_id set)--> scheduler
#   scheduler --StepPlan--> worker-i --StepDone | StepFailed--> scheduler --EngineOutputs--> frontend
#   scheduler --RequestsFinished--> router          worker-i --WorkerHeartbeat--> router
#   router --WorkerDown/WorkerUp--> scheduler       worker-i --SamplerReport--> sampler
#   KV cache manager --(PUB "worker.<i>", KV events)--> router


class AddRequest(msgspec.Struct, tag="add", frozen=True):
    """A new engine request (one of a prompt's n completions)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    arrival_time: float  # time.time() at the frontend
    priority: int = 0
    worker_id: int | None = None  # None until the router has chosen
    # Tokens already generated: set when a request moves off a worker that died; the new
    # worker recomputes prompt + these, and generation carries on where it stopped.
    output_token_ids: list[int] = []
    # The router's estimate of the prompt's full blocks the chosen worker caches (from its KV
    # events): what a disaggregated scheduler subtracts before deciding where the prompt runs.
    num_cached_blocks: int = 0


class AbortRequest(msgspec.Struct, tag="abort", frozen=True):
    """Finish these requests now: the client left ("abort"), or a stop string matched ("stop")."""

    req_ids: list[str]
    reason: str = "abort"  # "abort" or "stop"


class StepPlan(msgspec.Struct, tag="plan", frozen=True):
    """One step for one worker: exactly the scheduler's decision, with the KV manager's block ids."""

    worker_id: int
    output: SchedulerOutput
    # Which scheduler process planned it (random, per start): a worker that sees a new one drops
    # every request it holds (a restarted scheduler knows none of them) and tags its results with it.
    scheduler_id: str = ""


class StepDone(msgspec.Struct, tag="done", frozen=True):
    """A worker ran a ``StepPlan``: the sampled tokens, and where its time went."""

    worker_id: int
    step: int
    output: ModelRunnerOutput
    forward_s: float  # model forward (with the input preparation)
    sample_s: float  # sampling, including the one copy of sampled ids to the host
    scheduler_id: str = ""  # the StepPlan's: a restarted scheduler ignores results of its predecessor's plans


class StepFailed(msgspec.Struct, tag="failed", frozen=True):
    """A worker's step raised: the scheduler fails that step's requests; the worker carries on."""

    worker_id: int
    step: int
    error: str  # the exception, as text
    scheduler_id: str = ""  # the StepPlan's


class EngineOutputs(msgspec.Struct, tag="outputs", frozen=True):
    """What one worker's step produced for the frontend: new tokens, finished requests."""

    outputs: list[EngineCoreOutput]


class RequestRejected(msgspec.Struct, tag="rejected", frozen=True):
    """A request the pipeline gave up: "invalid" (the client's fault, 400), "unavailable" (no
    worker can take it, 503) or "error" (its step failed in the worker, 503)."""

    req_id: str
    kind: str
    message: str


class RequestsFinished(msgspec.Struct, tag="finished", frozen=True):
    """Scheduler -> router: these requests no longer load their worker."""

    req_ids: list[str]


class WorkerHeartbeat(msgspec.Struct, tag="beat", frozen=True):
    """Worker -> router, from a thread of its own every interval, even during a long forward."""

    worker_id: int
    pid: int
    sent_at: float  # time.monotonic(): one clock for the whole host


class WorkerDown(msgspec.Struct, tag="down", frozen=True):
    """Router -> scheduler: the worker stopped beating; fail its requests and forget its cache."""

    worker_id: int
    reason: str


class WorkerUp(msgspec.Struct, tag="up", frozen=True):
    """Router -> scheduler: the worker (restarted, empty cache) beats again."""

    worker_id: int


class SamplerReport(msgspec.Struct, tag="sampled", frozen=True):
    """Worker -> sampler, each step: how much the sampler implementation did."""

    worker_id: int
    num_tokens: int
    num_greedy: int  # of those, sampled with temperature 0
    seconds: float
    num_constrained: int = 0  # of those, masked by a grammar (structured outputs, tool calls)


class SwapRolledBack(msgspec.Struct, tag="rolled_back", frozen=True):
    """Worker -> sampler: the sampler swapped in raised in a step; this worker put the previous one back."""

    worker_id: int
    error: str


PipelineMessage = (
    AddRequest
    | AbortRequest
    | StepPlan
    | StepDone
    | StepFailed
    | EngineOutputs
    | RequestRejected
    | RequestsFinished
    | WorkerHeartbeat
    | WorkerDown
    | WorkerUp
    | SamplerReport
    | SwapRolledBack
)


# The KV cache manager's one RPC method, ``apply(pool, ops) -> KVApplyReply``. The
# scheduler's client sends each request's tokens once, in pieces (``new_token_ids``: those
# the manager has not seen), so the manager can hash blocks without a copy of every prompt
# in every call. Ops that return nothing are queued and sent ahead of the next op that
# returns something, so a step costs one or two round trips, not one per request.


class KVGetComputed(msgspec.Struct, tag="kv_get", frozen=True):
    """``get_computed_blocks``; result: [block ids of the prefix hit, tokens they hold]."""

    req_id: str
    new_token_ids: list[int]
    num_computed_tokens: int


class KVAllocate(msgspec.Struct, tag="kv_alloc", frozen=True):
    """``allocate_slots``; result: the new block ids, or None when too few blocks are free."""

    req_id: str
    new_token_ids: list[int]
    num_computed_tokens: int
    num_new_tokens: int
    hit_block_ids: list[int]  # from a KVGetComputed just before, for an admission
    num_hit_tokens: int


class KVAdmit(msgspec.Struct, tag="kv_admit", frozen=True):
    """One admission of a waiting request, as the scheduler makes it: the prefix-cache lookup,
    then an allocation for what the token budget allows; result: [the blocks it gained (the
    hit's, then new ones), tokens hit, tokens to compute now], or None when too few blocks are free.

    ``follows``: the next of a run (``KVCacheManagerClient.prepare_admissions``): its budget is
    what the KV op before it in the call left, and it is not tried (None) if that one was not
    admitted or used it up."""

    req_id: str
    new_token_ids: list[int]
    num_computed_tokens: int
    token_budget: int
    follows: bool = False


class KVCacheComputed(msgspec.Struct, tag="kv_cache", frozen=True):
    """``cache_blocks`` after a forward; result: None."""

    req_id: str
    new_token_ids: list[int]
    num_computed_tokens: int


class KVFree(msgspec.Struct, tag="kv_free", frozen=True):
    """``free``; result: None."""

    req_id: str


KVOp = KVGetComputed | KVAllocate | KVAdmit | KVCacheComputed | KVFree


class KVApplyReply(msgspec.Struct, frozen=True):
    results: list[Any]  # one per op, in order
    num_free_blocks: int  # of the pool, after the ops
    usage: float
    apply_s: float = 0.0  # how long the manager worked on the ops (the rest of a round trip is transit)


class KVSnapshot(msgspec.Struct, frozen=True):
    """What one pool's prefix cache can find (``KVCacheService.kv_snapshot``), for a router that lost KV events.

    ``seq``: the number its next KV event on ``worker.<pool>`` will carry. The snapshot is what
    the events before it built, so a router replaces its view with ``block_hashes`` and then
    applies only the events numbered ``seq`` and after."""

    pool: int
    seq: int
    block_hashes: list[bytes]
