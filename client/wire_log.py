"""A Flower client mod that keeps a copy of every message a site receives and sends.

For auditors: what left the site, byte for byte, in Flower's own wire encoding (protobuf).
`privdistill`'s wire tests use it to prove no record, canary or 8-token window leaves a site.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import message_to_proto


def wire_capture_mod(directory: str | Path):
    """A mod writing ``<node>-<uuid>-{in,out}.bin`` under ``directory`` for each message."""
    directory = str(directory)

    def capture(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        Path(directory).mkdir(parents=True, exist_ok=True)
        stem = f"{context.node_id}-{uuid.uuid4().hex}"
        for kind, message in (("in", msg), ("out", reply)):
            (Path(directory) / f"{stem}-{kind}.bin").write_bytes(message_to_proto(message).SerializeToString())
        return reply

    return capture

