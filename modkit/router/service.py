"""The router process: picks a worker for each request, and notices workers that die.

::

    frontend --AddRequest / AbortRequest--> router.in --AddRequest(worker_id) / AbortRequest--> scheduler.in
    scheduler --RequestsFinished--> router.in           (the request no longer loads its worker)
    worker-i --WorkerHeartbeat, every 0.5 s--> router.in
    KV cache manager --PUB worker.<i>: BlockStored / BlockRemoved--> router (what worker i caches)

A new router takes every worker as alive (the launcher started them), but says it serves
(``/health`` "ok") only once one of them has sent it a heartbeat. A worker with no heartbeat
for ``worker_timeout_s`` is marked dead: the router routes
nothing more to it and tells the scheduler (``WorkerDown``), which sends that worker's
requests back here, with their outputs so far, to be routed to a live worker. When its
heartbeats come back (a restarted worker), it is routed to again. A worker whose
heartbeats come from another pid was restarted faster than that: it is declared dead and
back at once, so that the scheduler moves the requests the old process held.

What each worker caches, the router learns from the KV cache manager's events (topic
``worker.<i>``, numbered from 0). Its view of a worker is complete while every event has
come, one number after the other. ZeroMQ drops events: those sent before the router's
subscription arrived (at launch the scheduler clears each pool before it; a restarted router
misses all that came before it), and those past a slow subscriber's high-water mark. When a
number is skipped, or before the first request is routed with no event yet, the router asks
the KV cache manager for a snapshot of the pool (``KVCacheService.kv_snapshot``: the hashes
its events so far leave cached, and the number of the next) and replaces its view with it.
Events still on their way that the snapshot already holds are applied again, which changes
nothing: each event sets hashes present or absent, and applied in order the last word on
each hash is the snapshot's. Numbers that go back on any pool mean the KV cache manager
started again: every view is emptied, and those of the other pools wait for a snapshot.
(Until an event of the new KV cache manager arrives, nothing tells the router it restarted.)
``/stats`` counts, per worker, the events that came, those lost before the last that came
(``Subscriber.lost``), the snapshots taken, and how many of the pool's events the view holds
(``kv_view_events``: those that came, or those a snapshot holds); the KV cache manager's
``/stats`` counts what each pool published.

Restarts of this router: messages in its inbox are lost, and the new one starts with no
request routed; the frontend sends its requests in flight again (``resubmit``), and
``RequestsFinished`` or aborts for requests it never routed are passed on or ignored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from modkit.config import PipelineConfig
from modkit.guard import SwapOwner, failure, in_charge, put_back, trial
from modkit.kvcache.events import KVEvent, event_from_wire
from modkit.pipeline.addresses import PipelineAddresses
from modkit.protocol import (
    AbortRequest,
    AddRequest,
    KVSnapshot,
    PipelineMessage,
    RequestRejected,
    RequestsFinished,
    WorkerDown,
    WorkerHeartbeat,
    WorkerUp,
)
from modkit.router.policies import ROUTER_POLICIES, GuardedRouterPolicy, RouterPolicy, try_router_policy
from modkit.router.router import NoWorkerError, Router
from modkit.swap import ImplSpec, resolve
from modkit.trace.events import EventPublisher, Routed, Swapped
from modkit.transport import Inbox, Outbox, RemoteError, RpcClient, RpcTimeoutError, Subscriber
from modkit.transport.codec import convert

log = logging.getLogger(__name__)
KV_SNAPSHOT_TIMEOUT_S = 2.0  # a KV cache manager that does not answer by then: route on what is known
KV_SNAPSHOT_RETRY_S = 5.0  # and ask again no sooner than this


@dataclass(slots=True)
class KVView:
    """How far the router's view of one worker's cache (``WorkerView.cached``) can be trusted."""

    complete: bool = False  # every event since the start of the pool, or since a snapshot, came
    next_seq: int | None = None  # the number that follows the last event that came
    snapshot_seq: int = 0  # the last snapshot holds the events numbered below this
    num_snapshots: int = 0
    retry_at: float = 0.0  # after a snapshot that failed


class RouterService(SwapOwner):
    def __init__(
        self, config: dict[str, Any], ipc_dir: str, worker_timeout_s: float = 3.0, swap_key: str | None = None
    ) -> None:
        cfg = PipelineConfig.from_dict(config)
        self.started = time.time()
        self.swap_key = swap_key  # verifies classes sent by value (modkit.swap); None: none accepted
        self.last_swap_error: str | None = None
        # With disaggregation requests are routed to decode workers; the scheduler picks a prefill worker.
        routed_to = [i for i in range(cfg.num_workers) if cfg.worker_role(i) != "prefill"]
        self.router = Router(cfg.num_workers, cfg.block_size, cfg.router_policy, routed_to)
        self.implementation = cfg.router_policy
        self.previous_implementation = cfg.router_policy  # shown again if a swapped-in policy is put aside
        self.worker_timeout_s = worker_timeout_s
        addresses = PipelineAddresses(ipc_dir, cfg.addresses or {})
        self.inbox = Inbox(addresses.inbox("router"), allow_remote=cfg.allow_remote)
        self.kv_events = Subscriber(addresses.kv_events, topics=("worker.",))
        self.kv_rpc = RpcClient(addresses.rpc("kv_cache_manager"), KV_SNAPSHOT_TIMEOUT_S)
        self.kv_views = {i: KVView() for i in self.router.workers}
        self.to_scheduler = Outbox(addresses.inbox("scheduler"))
        self.to_frontend = Outbox(addresses.inbox("frontend"))
        self.events = EventPublisher("router", addresses.events("router"), cfg.allow_remote)
        now = time.monotonic()
        self.last_beat = {i: now for i in self.router.workers}  # the launcher started them just now
        self.worker_pids: dict[int, int] = {}  # the process each worker's heartbeats came from last
        self.num_kv_events = 0

    def wait_sockets(self) -> list[Any]:
        return [self.inbox, self.kv_events]

    def run_once(self) -> bool:
        # What changed in the workers first (finished requests, heartbeats, cached blocks), then
        # the decisions: a request that arrives in the same batch as the news that another one
        # finished is routed knowing it (the scheduler also tells this router before the frontend).
        messages = self.inbox.drain()
        for message in messages:
            if not isinstance(message, AddRequest | AbortRequest):
                self._handle(message)
        heard = set()
        while (delivery := self.kv_events.recv(0)) is not None:
            worker_id = int(delivery.topic.removeprefix("worker."))
            if worker_id in self.router.workers:
                self._on_kv_event(worker_id, delivery.seq, event_from_wire(delivery.payload))
                heard.add(worker_id)
        routing = any(isinstance(m, AddRequest) for m in messages)
        for worker_id, view in self.kv_views.items():
            if not view.complete and (routing or worker_id in heard):
                self._take_kv_snapshot(worker_id)
        for message in messages:
            if isinstance(message, AddRequest | AbortRequest):  # in their order: an abort may follow its add
                self._handle(message)
        self._check_heartbeats()
        return False

    def _on_kv_event(self, worker_id: int, seq: int, event: KVEvent) -> None:
        """Apply one of worker ``worker_id``'s KV events, and note whether any before it never came."""
        view = self.kv_views[worker_id]
        if view.next_seq is not None and seq < view.next_seq:  # numbered afresh: a new KV cache manager,
            for other_id, other in self.kv_views.items():  # whose pools all started empty
                self.router.on_kv_snapshot(other_id, [])
                other.complete, other.next_seq, other.snapshot_seq = False, None, 0
            view.complete = seq == 0
        elif seq > max(view.next_seq or 0, view.snapshot_seq):  # those in between never came
            view.complete = False
        elif seq == 0:  # the pool's first event: nothing before it to miss
            view.complete = True
        self.router.on_kv_event(worker_id, event)  # one the snapshot holds already changes nothing
        view.next_seq = seq + 1
        self.num_kv_events += 1

    def _take_kv_snapshot(self, worker_id: int) -> None:
        """Replace the view of a worker's cache with the KV cache manager's snapshot of its pool."""
        view = self.kv_views[worker_id]
        if not self.router.workers[worker_id].alive or time.monotonic() < view.retry_at:
            return
        try:
            snapshot = convert(self.kv_rpc.call("kv_snapshot", worker_id), KVSnapshot)
        except (RpcTimeoutError, RemoteError) as error:
            log.warning("no snapshot of worker %d's KV cache (%s): routing on what is known", worker_id, error)
            view.retry_at = time.monotonic() + KV_SNAPSHOT_RETRY_S
            return
        self.router.on_kv_snapshot(worker_id, snapshot.block_hashes)
        view.complete, view.snapshot_seq = True, snapshot.seq
        view.num_snapshots += 1

    def _handle(self, message: PipelineMessage) -> None:
        if isinstance(message, AddRequest):
            try:
                worker_id = self._route(message)
            except NoWorkerError as error:
                self.to_frontend.send(RequestRejected(message.req_id, "unavailable", str(error)))
                return
            seen = self.router.last_seen
            self.to_scheduler.send(_with_worker(message, worker_id, seen.get(worker_id, (0, 0))[0]))
            routed = Routed(
                time.time(),
                message.req_id,
                worker_id,
                self.implementation,
                -(-len(message.prompt_token_ids) // self.router.block_size),
                {w: cached for w, (cached, _) in seen.items()},
                {w: active for w, (_, active) in seen.items()},
            )
            self.events.publish("route", routed)
        elif isinstance(message, AbortRequest):
            self.to_scheduler.send(message)
        elif isinstance(message, RequestsFinished):
            for req_id in message.req_ids:
                self.router.finish(req_id)
        elif isinstance(message, WorkerHeartbeat) and message.worker_id in self.router.workers:
            self.last_beat[message.worker_id] = max(self.last_beat[message.worker_id], message.sent_at)
            before = self.worker_pids.setdefault(message.worker_id, message.pid)
            if before != message.pid:  # restarted before its silence was noticed: what the old one held is lost
                self.worker_pids[message.worker_id] = message.pid
                if self.router.workers[message.worker_id].alive:
                    self._mark_dead(message.worker_id)
                    self.to_scheduler.send(WorkerDown(message.worker_id, f"restarted (pid {before} -> {message.pid})"))
            if not self.router.workers[message.worker_id].alive:
                self.router.mark_alive(message.worker_id)
                self.to_scheduler.send(WorkerUp(message.worker_id))

    def _route(self, message: AddRequest) -> int:
        """The router's choice; a swapped-in policy that failed on it is replaced by the one before it, at once."""
        worker_id = self.router.route(message.req_id, message.prompt_token_ids)
        self._check_swapped_policy()
        return worker_id

    # -- swapping the routing policy (the mechanism: modkit.guard) -----------------------------

    def swap(self, spec: ImplSpec) -> dict[str, Any]:
        """Route with another ``RouterPolicy`` from the next request on (tried first on an empty prompt)."""
        cls = resolve(spec, ROUTER_POLICIES.get, self.swap_key)
        if not issubclass(cls, RouterPolicy):
            raise TypeError(f"{cls.__name__} is not a RouterPolicy")
        policy = cls()
        trial(policy, lambda p: try_router_policy(p, [w for w in self.router.workers.values() if w.alive]))
        self.router.policy = GuardedRouterPolicy(policy, in_charge(self.router.policy))
        previous = self.previous_implementation = self.implementation
        self.implementation = spec.label(cls)
        self._swapped_in("router", self.implementation, previous)
        return {"implementation": self.implementation, "previous": previous}

    def _check_swapped_policy(self) -> None:
        error = failure(self.router.policy)
        if error is not None:
            self.router.policy = put_back(self.router.policy)
            failed, self.implementation = self.implementation, self.previous_implementation
            self._rolled_back("router", self.implementation, failed, error)

    def _publish_swapped(self, event: Swapped) -> None:
        self.events.publish("swap.router", event)

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for worker_id, view in self.router.workers.items():
            silent = now - self.last_beat[worker_id]
            if view.alive and silent > self.worker_timeout_s:
                self._mark_dead(worker_id)
                self.to_scheduler.send(WorkerDown(worker_id, f"no heartbeat for {silent:.1f} s"))

    def _mark_dead(self, worker_id: int) -> None:
        self.router.mark_dead(worker_id)  # forgets what it cached: if it comes back, a snapshot will say
        self.kv_views[worker_id].complete = False

    def announce_events(self, token: str) -> None:
        """Publish ``Hello(token)``: tells a new subscriber that its subscription arrived."""
        self.events.announce(token)

    def health(self) -> dict[str, Any]:
        """ "ok" while a worker that has sent this router a heartbeat is alive; "starting" while none
        has sent one yet (loading its model, or started after this router); "error" once none is alive."""
        alive = [i for i, w in self.router.workers.items() if w.alive]
        heard = [i for i in alive if i in self.worker_pids]
        starting = not self.worker_pids  # none has ever sent one: none is up yet
        error = None if heard else "no worker has sent a heartbeat yet" if starting else "no worker is alive"
        return {
            "status": "ok" if heard else "starting" if starting else "error",
            "component": "router",
            "implementation": self.implementation,
            "uptime_s": round(time.time() - self.started, 3),
            "workers_alive": alive,
            "workers_heard": heard,
            "last_swap_error": self.last_swap_error,
            **({} if error is None else {"error": error}),
        }

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "policy": self.implementation,
            "decisions": {str(k): v for k, v in sorted(self.router.decisions.items())},
            "num_kv_events": self.num_kv_events,
            "kv_events_missed": self.kv_events.missed,
            "kv_events_lost": sum(self.kv_events.lost(f"worker.{i}") for i in self.router.workers),
            "kv_snapshots": sum(view.num_snapshots for view in self.kv_views.values()),
            "workers": [
                {
                    "worker_id": i,
                    "alive": w.alive,
                    "num_active_requests": w.num_active_requests,
                    "active_blocks": w.active_blocks,
                    "num_cached_blocks": len(w.cached),
                    # Of its pool's KV events (worker.<i>), as many as have come and those lost before the last
                    # that came: the KV cache manager's /stats counts what each pool published.
                    "num_kv_events": self.kv_events.received.get(f"worker.{i}", 0),
                    "kv_events_lost": self.kv_events.lost(f"worker.{i}"),
                    # Whether every event since the pool's start or the last snapshot came; snapshots taken.
                    "kv_view_complete": self.kv_views[i].complete,
                    # How many of its pool's events the view holds, as they came or in a snapshot: the
                    # KV cache manager's count of them once the view has caught up.
                    "kv_view_events": max(self.kv_views[i].next_seq or 0, self.kv_views[i].snapshot_seq),
                    "kv_snapshots": self.kv_views[i].num_snapshots,
                    "heartbeat_age_s": round(now - self.last_beat[i], 3),
                }
                for i, w in self.router.workers.items()
            ],
        }

    def close(self) -> None:
        for closable in (self.inbox, self.kv_events, self.kv_rpc, self.to_scheduler, self.to_frontend, self.events):
            closable.close()


def _with_worker(message: AddRequest, worker_id: int, num_cached_blocks: int) -> AddRequest:
    return AddRequest(
        message.req_id,
        message.prompt_token_ids,
        message.sampling_params,
        message.eos_token_ids,
        message.arrival_time,
        message.priority,
        worker_id,
        message.output_token_ids,
        num_cached_blocks,
    )
