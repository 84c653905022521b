"""A KV connector that tests/test_disaggregation.py names in ``kv_connector`` to inject failed transfers.

It lives in tests/, not in the package; the tests put this folder on the children's PYTHONPATH.
"""

from __future__ import annotations

from modkit.kvtransfer.metadata import KVConnectorMetadata
from modkit.kvtransfer.worker_side import ZmqKVConnector


class ForgetfulConnector(ZmqKVConnector):
    """The real connector, except that a prefill worker keeps no blocks: every read finds nothing,
    and the decode worker must compute the prompt itself (its real fallback)."""

    def wait_for_save(self, meta: KVConnectorMetadata | None) -> None:
        super().wait_for_save(meta)
        self.kept.clear()
