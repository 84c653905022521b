"""The scheduler side of the KV connector: which tokens a decode worker loads instead of computing.

A prefill worker's ``Scheduler`` runs a request with ``max_tokens=1``; its connector names the
request in ``reqs_to_save`` in the step that computes the prompt's last token, so the worker
keeps those blocks. A decode worker's ``Scheduler`` then admits the request with the prompt;
at admission, after its own prefix-cache hit of ``h`` tokens, ``get_num_new_matched_tokens``
says the remote worker holds the prompt's tokens ``h`` ... ``n - 2``; the scheduler counts
them as computed and schedules only the last prompt token, whose logits give the first output
token (as vLLM's P/D connectors do). ``update_state_after_alloc`` turns that into the blocks to
load, sent in the plan (``build_connector_meta``). The remote KV is used once: a request
preempted on the decode side is recomputed there, from its prefix cache if it can.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from modkit.kvtransfer.metadata import KVConnectorMetadata, LoadSpec
from modkit.request import Request


@dataclass(slots=True)
class _Remote:
    src_worker_id: int
    num_tokens: int  # the prompt tokens the prefill worker computed


class SchedulerConnector:
    """One per worker's ``Scheduler``: ``prefill`` (saves prompts) or ``decode`` (loads them)."""

    def __init__(self, role: str, block_size: int) -> None:
        assert role in ("prefill", "decode"), role
        self.role, self.block_size = role, block_size
        self.remote: dict[str, _Remote] = {}  # decode: requests whose prompt a prefill worker computed
        self.to_save: set[str] = set()  # prefill: requests whose blocks the decode side will read
        self._save: dict[str, list[int]] = {}
        self._load: dict[str, LoadSpec] = {}

    # -- set up by the scheduler process ---------------------------------------------------

    def add_remote(self, req_id: str, src_worker_id: int, num_tokens: int) -> None:
        """Decode side: ``req_id``'s first ``num_tokens`` tokens were computed on ``src_worker_id``."""
        self.remote[req_id] = _Remote(src_worker_id, num_tokens)

    # -- vLLM's scheduler-side calls -----------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        """Tokens past the local hit that the remote worker computed: all the prompt but its last token."""
        remote = self.remote.get(request.req_id)
        if remote is None:
            return 0
        return max(min(remote.num_tokens, request.num_prompt_tokens) - 1 - num_computed_tokens, 0)

    def update_state_after_alloc(
        self, request: Request, block_ids: Callable[[], list[int]], num_hit: int, num_external: int
    ) -> None:
        """The blocks for the ``num_external`` tokens after the ``num_hit`` cached ones: load them.

        ``block_ids`` is asked only for a request that loads: asking the KV cache manager's client
        for a block table ends the run of admissions it prepared in one round trip.
        """
        remote = self.remote.pop(request.req_id, None)  # used once: a preempted request recomputes
        if remote is None or num_external == 0:
            return
        first = num_hit // self.block_size
        last = -(-(num_hit + num_external) // self.block_size)  # past the block of the last loaded token
        table = block_ids()
        assert last <= len(table)
        self._load[request.req_id] = LoadSpec(remote.src_worker_id, first, last - first)

    def build_connector_meta(
        self, requests: dict[str, Request], scheduled: dict[str, int], block_ids: Callable[[str], list[int]]
    ) -> KVConnectorMetadata:
        """After the step is planned (``num_computed_tokens`` advanced): what its worker saves and loads."""
        for req_id in scheduled:
            request = requests[req_id]
            if req_id in self.to_save and request.num_computed_tokens >= request.num_prompt_tokens:
                self.to_save.discard(req_id)
                self._save[req_id] = block_ids(req_id)  # its whole block table
        meta = KVConnectorMetadata(dict(self._save), dict(self._load))
        self._save.clear()
        self._load.clear()
        return meta

    def request_finished(self, req_id: str) -> None:
        """Forget a request that ended (an abort, a failure) before its blocks moved."""
        self.remote.pop(req_id, None)
        self.to_save.discard(req_id)
