"""Generate messages/schema.json, the JSON Schema of every berth message.

The document is built from the pydantic models in messages.models, so
programs in other languages can validate berth messages without Python.

    python -m messages.schema          # write messages/schema.json
    python -m messages.schema --check  # exit 1 if messages/schema.json is stale
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from messages import models

SCHEMA_PATH = Path(__file__).with_name("schema.json")

DIALECT = "https://json-schema.org/draft/2020-12/schema"

TITLE = "berth messages"

DESCRIPTION = (
    "Messages of the berth container manager, exchanged over RabbitMQ."
    " A client sends a Command to a manager and receives a Reply."
    " A manager publishes an Event for every container state change."
    " An assistant sends a Heartbeat to its manager and receives a HeartbeatReply,"
    " and the manager sends it ControlOrder messages."
    " docs/protocol.md describes the exchanges, queues and routing keys."
)

MESSAGE_TYPES: dict[str, Any] = {
    "Command": models.Command,
    "Reply": models.Reply,
    "Event": models.Event,
    "Heartbeat": models.Heartbeat,
    "HeartbeatReply": models.HeartbeatReply,
    "ControlOrder": models.ControlOrder,
}
"""Top-level message types, by the name of their ``$defs`` entry."""


def build_schema() -> dict[str, Any]:
    """Build the schema document from the models.

    Every message type and every model it contains gets a ``$defs`` entry.
    The document's own root accepts any one of the message types.
    """
    # Validation mode describes what a receiver accepts, which is the
    # contract for senders in other languages too.
    # NOTE: replies leave out null fields, so a reply carrying an exit with
    # exit_code null does not validate against this schema.
    inputs = [
        (name, "validation", TypeAdapter(message_type))
        for name, message_type in MESSAGE_TYPES.items()
    ]
    roots, definitions = TypeAdapter.json_schemas(inputs, ref_template="#/$defs/{model}")
    defs = definitions["$defs"]

    # Each model gets a $defs entry under its class name, but the Command
    # union has no class, so its schema comes back only as a root.
    for name in MESSAGE_TYPES:
        root = roots[(name, "validation")]
        if root == {"$ref": f"#/$defs/{name}"}:
            continue
        if name in defs:
            raise ValueError(
                f"cannot add the {name} union to $defs: a model named {name!r} is"
                " already there; rename one of them"
            )
        defs[name] = root

    return {
        "$schema": DIALECT,
        "title": TITLE,
        "description": DESCRIPTION,
        "x-schema-version": models.SCHEMA_VERSION,
        "$defs": defs,
        "anyOf": [{"$ref": f"#/$defs/{name}"} for name in MESSAGE_TYPES],
    }


def render_schema() -> str:
    """Return the schema document as the text stored in schema.json."""
    return json.dumps(build_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m messages.schema",
        description="Write the JSON Schema of berth's messages, built from messages/models.py.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the file differs from the models",
    )
    parser.add_argument(
        "--path",
        type=Path,
        default=SCHEMA_PATH,
        help="schema file to write or check (default: %(default)s)",
    )
    options = parser.parse_args(argv)
    text = render_schema()

    if options.check:
        try:
            current = options.path.read_text()
        except FileNotFoundError:
            current = None
        if current != text:
            state = "missing" if current is None else "stale"
            print(
                f"{options.path} is {state}: run `python -m messages.schema`"
                " and commit the result",
                file=sys.stderr,
            )
            return 1
        return 0

    options.path.write_text(text)
    print(f"wrote {options.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
