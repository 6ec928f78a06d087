"""The node's peer id on every log record, so that a cluster's merged logs say who spoke."""

from __future__ import annotations

import logging


class NodeField(logging.Filter):
    """A handler filter that sets ``record.node``; one per process (one node per process)."""

    node = ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        return True


NODE_FIELD = NodeField()


def set_log_node(peer_id: str) -> None:
    NODE_FIELD.node = peer_id
