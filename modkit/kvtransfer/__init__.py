"""Disaggregated prefill and decode: the KV connector that moves a request's blocks between workers.

In vLLM's vocabulary (``KVConnectorBase_V1``) a connector has two halves:

- the scheduler side (``SchedulerConnector``): ``get_num_new_matched_tokens`` (how many of a
  request's tokens a remote worker computed and this worker lacks), ``update_state_after_alloc``
  (the blocks the KV cache manager allocated for them), ``build_connector_meta`` (what the
  worker must save or load this step, in the plan), ``request_finished``;
- the worker side (``KVConnector``, ``ZmqKVConnector``): ``start_load_kv`` (fill the plan's
  blocks before the forward), ``wait_for_save`` (keep the blocks of prompts finished this step
  for the decode worker to read), ``get_finished`` (the transfers done since the last call).

``KV_CONNECTORS`` names the implementations; ``PipelineConfig.kv_connector`` picks one.
"""

from modkit.kvtransfer.metadata import KVConnectorMetadata, LoadSpec
from modkit.kvtransfer.scheduler_side import SchedulerConnector

__all__ = ["KVConnectorMetadata", "LoadSpec", "SchedulerConnector"]
