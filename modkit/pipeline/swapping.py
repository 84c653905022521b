"""``Pipeline.swap``: which process each swap goes to, and the checks made before anything is sent.

::

    component          what is swapped (its registry)                who swaps it
    scheduler          the scheduling policy (POLICIES)              the scheduler process, for every worker
    kv_cache_manager   the eviction policy (EVICTION_POLICIES)       the KV cache manager, for every pool
    router             the routing policy (ROUTER_POLICIES)          the router
    sampler            the sampler (SAMPLERS)                        the sampler process, which tells each worker
    attention          the attention backend (ATTENTION_BACKENDS)    each worker, all or none

Each receiver tries the new implementation on a probe before it takes over, guards it
afterwards, and puts the previous one back if it raises: one mechanism for all five,
``modkit.guard``; each part supplies its probe and its guard class (``GuardedPolicy``,
``GuardedEviction``, ``GuardedRouterPolicy``, ``GuardedSampler``, ``GuardedAttention``).

Some swaps replace a whole component's implementation rather than a policy: ``"vllm"`` (or
``"modkit"`` again) for the ``scheduler`` or the ``kv_cache_manager`` puts vLLM's own V1
scheduler or KV cache manager in charge (``modkit.vllm_v1``; needs vllm), and a subclass of
modkit's ``Scheduler`` (sent by value, signed, like a policy) replaces the scheduler.
Requests cannot be handed over between them (their queues and block tables are the
scheduler's state), so the pipeline drains first and says so (``"drained": True`` in the
reply): the scheduler keeps new requests back, the ones already there finish, the swap
happens, and the requests kept back go in.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec

from modkit.pipeline.addresses import worker_name
from modkit.scheduler.scheduler import Scheduler
from modkit.swap import ImplSpec, spec_for

if TYPE_CHECKING:
    from modkit.pipeline.launcher import Pipeline

SWAPPABLE = ("scheduler", "kv_cache_manager", "router", "sampler", "attention")
LOOPBACK = ("ipc://", "tcp://127.", "tcp://localhost:", "tcp://[::1]")
RPC_TIMEOUT_S = 60.0
WHOLE = ("modkit", "vllm")  # implementations of a whole scheduler or KV cache manager: swapped after a drain
DRAIN_TIMEOUT_S = 300.0


def swap_component(p: Pipeline, component: str, impl: str | type, allow_remote_code: bool) -> dict[str, Any]:
    """What ``Pipeline.swap`` does: the reply of the component that swapped, ``implementation`` and ``previous``."""
    if component not in SWAPPABLE:
        raise ValueError(f"{component!r} cannot be swapped; swappable: {', '.join(SWAPPABLE)}")
    spec = spec_for(impl, p.swap_key)
    workers = [worker_name(i) for i in range(p.config.num_workers)]
    # The attention backend lives in each worker; the sampler process passes code on to the workers.
    receivers = {"attention": workers, "sampler": ["sampler", *workers]}.get(component, [component])
    for receiver in receivers:
        address = p.addresses.rpc(receiver)
        if spec.code is not None and not address.startswith(LOOPBACK) and not allow_remote_code:
            raise PermissionError(
                f"{receiver} listens on {address}, not on this machine: sending it code needs allow_remote_code=True"
            )
    if component == "attention":
        return _swap_attention(p, spec, workers)
    if component in ("scheduler", "kv_cache_manager") and spec.name in WHOLE:
        return _swap_drained(p, component, spec)
    if component == "scheduler" and isinstance(impl, type) and issubclass(impl, Scheduler):
        return _swap_drained(p, component, spec)  # a whole scheduler of your own
    with p.processes[component].client(timeout_s=RPC_TIMEOUT_S) as rpc:
        return dict(rpc.call("swap", spec))


def _swap_drained(p: Pipeline, component: str, spec: ImplSpec) -> dict[str, Any]:
    """Hold new requests at the scheduler, let the others finish, swap, let the held ones in."""
    with p.processes["scheduler"].client(timeout_s=RPC_TIMEOUT_S) as scheduler:
        unfinished = int(scheduler.call("hold_new_requests", True)["unfinished"])
        try:
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while unfinished:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{unfinished} requests still unfinished after {DRAIN_TIMEOUT_S:.0f} s of draining"
                    )
                time.sleep(0.02)
                unfinished = int(scheduler.call("num_unfinished"))
            with p.processes[component].client(timeout_s=RPC_TIMEOUT_S) as rpc:
                return dict(rpc.call("swap", spec))
        finally:
            scheduler.call("hold_new_requests", False)


def _swap_attention(p: Pipeline, spec: ImplSpec, workers: list[str]) -> dict[str, Any]:
    """Every worker or none: if one refuses, the ones already switched are switched back."""
    switched: list[tuple[str, ImplSpec]] = []
    reply: dict[str, Any] = {}
    try:
        for name in workers:
            with p.processes[name].client(timeout_s=RPC_TIMEOUT_S) as rpc:
                reply = dict(rpc.call("use_attention", spec))
            switched.append((name, msgspec.convert(reply["previous_spec"], ImplSpec)))
    except BaseException:
        for name, previous in switched:
            with p.processes[name].client(timeout_s=RPC_TIMEOUT_S) as rpc:
                rpc.call("use_attention", previous)
        raise
    return {"implementation": reply["implementation"], "previous": reply["previous"]}
