"""The worker's side of a swap: its sampler and its attention backend, changed between two steps.

``WorkerService`` takes this mixin, so its own file keeps the step loop and its messages. The
mechanism is ``modkit.guard``; the probes and guards are ``modkit.sampler.swaps`` and
``modkit.worker.swaps``. The two parts are owned differently:

- the **sampler** is chosen by the sampler process, which calls ``use_sampler`` on every
  worker; a worker whose new sampler fails in a step puts the old one back and tells the
  sampler process (``SwapRolledBack``), which puts it back on the other workers and
  publishes the ``Swapped`` event;
- the **attention backend** is this worker's own: ``Pipeline.swap`` calls ``use_attention``
  on each worker, and each worker publishes its own ``Swapped`` events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modkit.attention import AttentionBackend
from modkit.attention.interface import ATTENTION_BACKENDS
from modkit.guard import SwapOwner, failure, in_charge, put_back, trial
from modkit.pipeline.addresses import worker_name
from modkit.protocol import SwapRolledBack
from modkit.sampler import Sampler
from modkit.sampler.interface import SAMPLERS
from modkit.sampler.swaps import GuardedSampler, try_sampler
from modkit.swap import ImplSpec, resolve
from modkit.worker.swaps import GuardedAttention, set_attention_backend, try_attention

if TYPE_CHECKING:
    import torch

    from modkit.model.decoder import CausalLM
    from modkit.trace.events import EventPublisher, Swapped
    from modkit.transport import Outbox
    from modkit.worker.worker import Worker


class WorkerSwapping(SwapOwner):
    """``use_sampler`` and ``use_attention`` (RPC), and ``_check_swaps`` after every step."""

    # Set by WorkerService.__init__.
    worker_id: int
    model: CausalLM
    device: torch.device
    worker: Worker
    swap_key: str | None  # verifies classes sent by value (modkit.swap); None: none accepted
    sampler: Sampler
    sampler_name: str
    previous_sampler_name: str  # shown again if a swapped-in sampler is put aside
    attention_backend: str
    previous_attention_backend: str
    attention_backend_spec: ImplSpec
    events: EventPublisher
    to_sampler: Outbox

    def use_sampler(self, spec: ImplSpec, seed: int, guarded: bool = True) -> dict[str, str]:
        """Sample with another implementation from the next step on (the sampler process asks).

        ``guarded``: keep the current one to fall back on; a rollback passes False.
        """
        sampler = resolve(spec, SAMPLERS.get, self.swap_key)(seed=seed)
        trial(sampler, lambda s: try_sampler(s, self.model.config.vocab_size, self.device))
        current = in_charge(self.sampler)
        self.previous_sampler_name, self.sampler_name = self.sampler_name, spec.label(type(sampler))
        self.sampler = GuardedSampler(sampler, current) if guarded else sampler
        return {"implementation": self.sampler_name, "previous": self.previous_sampler_name}

    def use_attention(self, spec: ImplSpec) -> dict[str, str | float | ImplSpec]:
        """Run attention with another backend from the next step on; it must match the current one on a probe."""
        if self.model.tp.size > 1:
            raise ValueError("an attention swap reaches rank 0 only: not supported with tensor_parallel_size > 1")
        backend = resolve(spec, ATTENTION_BACKENDS.get, self.swap_key)()
        if not isinstance(backend, AttentionBackend):
            raise TypeError(f"{type(backend).__qualname__} is not an AttentionBackend")
        current = in_charge(self._attention())
        dtype = self.model.lm_head.weight.dtype
        difference = trial(backend, lambda b: try_attention(b, current, self.model.config, dtype, self.device))
        previous, self.attention_backend = self.attention_backend, spec.label(type(backend))
        self.previous_attention_backend = previous
        previous_spec, self.attention_backend_spec = self.attention_backend_spec, spec
        set_attention_backend(self.model, GuardedAttention(backend, current))
        # The CUDA graphs replay the old backend's kernels, and a guard cannot run inside a
        # replay: from now on every step runs eagerly.
        self.worker.runner.drop_cuda_graphs()
        self._swapped_in(self._attention_component(), self.attention_backend, previous)
        return {
            "implementation": self.attention_backend,
            "previous": previous,
            "previous_spec": previous_spec,  # what Pipeline.swap puts back if another worker refuses
            "probe_max_abs_diff": difference,
        }

    def _attention(self) -> AttentionBackend:
        return self.model.attention_backend  # every layer holds the same one (set_attention_backend)

    def _attention_component(self) -> str:
        return f"{worker_name(self.worker_id)}.attention"

    def _check_swaps(self) -> None:
        """A swapped-in sampler or backend that failed in this step: put the previous one back."""
        error = failure(self.sampler)
        if error is not None:
            # The sampler process owns the choice: it rolls the others back and publishes the event.
            self.last_swap_error = error
            self.sampler, self.sampler_name = put_back(self.sampler), self.previous_sampler_name
            self.to_sampler.send(SwapRolledBack(self.worker_id, error))
        attention = self._attention()
        error = failure(attention)
        if error is not None:
            set_attention_backend(self.model, put_back(attention))
            failed, self.attention_backend = self.attention_backend, self.previous_attention_backend
            self._rolled_back(self._attention_component(), self.attention_backend, failed, error)

    def _publish_swapped(self, event: Swapped) -> None:
        self.events.publish(f"swap.{worker_name(self.worker_id)}", event)
