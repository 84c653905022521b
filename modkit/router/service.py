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

What each worker caches, the router learns from the KV cache manager's events, which
ZeroMQ drops until the router's subscription reaches the manager. The manager starts last,
and the scheduler clears each pool (``AllBlocksCleared``) as soon as it reaches it, so those
first events can go out before the subscription arrives. Nothing is lost by it (the router
starts knowing of no cached block), and the launch returns only once the subscription has
arrived. ``/stats`` counts, per worker, the events that came and those lost before the last
that came (``Subscriber.lost``, from their sequence numbers); the KV cache manager's
``/stats`` counts what each pool published.

Restarts of this router: messages in its inbox are lost, and the new one starts with no
request routed; the frontend sends its requests in flight again (``resubmit``), and
``RequestsFinished`` or aborts for requests it never routed are passed on or ignored.
"""

from __future__ import annotations

import time
from typing import Any

from modkit.config import PipelineConfig
from modkit.guard import SwapOwner, failure, in_charge, put_back, trial
from modkit.kvcache.events import event_from_wire
from modkit.pipeline.addresses import PipelineAddresses
from modkit.protocol import (
    AbortRequest,
    AddRequest,
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
from modkit.transport import Inbox, Outbox, Subscriber


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
        while (delivery := self.kv_events.recv(0)) is not None:
            worker_id = int(delivery.topic.removeprefix("worker."))
            if worker_id in self.router.workers:
                self.router.on_kv_event(worker_id, event_from_wire(delivery.payload))
                self.num_kv_events += 1
        for message in messages:
            if isinstance(message, AddRequest | AbortRequest):  # in their order: an abort may follow its add
                self._handle(message)
        self._check_heartbeats()
        return False

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
                    self.router.mark_dead(message.worker_id)
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
                self.router.mark_dead(worker_id)
                self.to_scheduler.send(WorkerDown(worker_id, f"no heartbeat for {silent:.1f} s"))

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
                    "heartbeat_age_s": round(now - self.last_beat[i], 3),
                }
                for i, w in self.router.workers.items()
            ],
        }

    def close(self) -> None:
        for closable in (self.inbox, self.kv_events, self.to_scheduler, self.to_frontend, self.events):
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
