"""The router: which worker serves a request (round robin, least loaded, KV-aware)."""

from modkit.router.policies import (
    ROUTER_POLICIES,
    KVAware,
    LeastLoaded,
    RoundRobin,
    RouterPolicy,
    WorkerView,
    get_router_policy,
    register_router_policy,
)
from modkit.router.router import NoWorkerError, Router

__all__ = [
    "ROUTER_POLICIES",
    "KVAware",
    "LeastLoaded",
    "NoWorkerError",
    "RoundRobin",
    "Router",
    "RouterPolicy",
    "WorkerView",
    "get_router_policy",
    "register_router_policy",
]
