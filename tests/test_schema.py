"""Tests of messages/schema.json, the JSON Schema generated from the models.

The samples are validated with the jsonschema package, as a program in
another language would validate them, and also with the pydantic models,
so that the schema and the manager accept and reject the same messages.
"""

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from messages import schema
from messages.models import (
    BadMessage,
    ContainerInfo,
    ContainerState,
    ErrorCode,
    ErrorInfo,
    Event,
    ExitInfo,
    ExitReason,
    Reply,
    parse_command,
)
from messages.names import event_routing_key

FINISHED_AT = datetime(2024, 5, 1, 12, 0, 30, tzinfo=timezone.utc)

CREATE_COMMAND = """
{
  "schema_version": 1,
  "request_id": "5f0c2a9e7d3b4c1a",
  "command": "create",
  "id": "web-1",
  "argv": ["/usr/bin/python3", "-m", "http.server", "8080"],
  "env": {"PYTHONUNBUFFERED": "1"},
  "cwd": "/tmp",
  "limits": {"memory_bytes": 268435456, "cpus": 0.5, "pids": 64},
  "labels": {"team": "web"},
  "heartbeat_timeout": 30
}
"""
"""A create command written by hand, as a client in another language sends it."""


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads(schema.SCHEMA_PATH.read_text())


def validator_for(document: dict[str, Any], name: str) -> Draft202012Validator:
    """Return a validator for the ``$defs`` entry ``name`` of the schema file."""
    return Draft202012Validator(
        {"$schema": schema.DIALECT, "$defs": document["$defs"], "$ref": f"#/$defs/{name}"},
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


def schema_errors(document: dict[str, Any], name: str, message: Any) -> list[str]:
    """Return the error messages of validating ``message`` as the ``$defs`` entry ``name``."""
    errors = validator_for(document, name).iter_errors(message)
    return [f"{error.json_path}: {error.message}" for error in errors]


# --- the file ----------------------------------------------------------------


def test_schema_file_is_current():
    current = schema.SCHEMA_PATH.read_text()
    assert current == schema.render_schema(), (
        "messages/schema.json differs from the models: run `python -m messages.schema`."
        " A pydantic version other than the one that wrote the file can also change it."
    )


def test_schema_is_valid_draft_2020_12(document):
    Draft202012Validator.check_schema(document)
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_defines_every_message_type(document):
    for name in ("Command", "Reply", "Event", "Heartbeat", "HeartbeatReply", "ControlOrder"):
        assert name in document["$defs"], f"$defs has no {name}"


def test_schema_rendering_is_deterministic():
    assert schema.render_schema() == schema.render_schema()


def test_check_passes_on_current_file(capsys):
    assert schema.main(["--check"]) == 0
    assert capsys.readouterr().err == ""


def test_check_fails_on_stale_file(tmp_path, capsys):
    stale = tmp_path / "schema.json"
    stale.write_text(schema.render_schema().replace("berth messages", "old title"))

    assert schema.main(["--check", "--path", str(stale)]) == 1
    assert "run `python -m messages.schema`" in capsys.readouterr().err


def test_check_fails_on_missing_file(tmp_path, capsys):
    missing = tmp_path / "schema.json"

    assert schema.main(["--check", "--path", str(missing)]) == 1
    assert "missing" in capsys.readouterr().err
    assert not missing.exists()


def test_write_then_check_passes(tmp_path):
    target = tmp_path / "schema.json"

    assert schema.main(["--path", str(target)]) == 0
    assert target.read_text() == schema.render_schema()
    assert schema.main(["--check", "--path", str(target)]) == 0


# --- valid messages ----------------------------------------------------------


def test_create_command_is_valid(document):
    message = json.loads(CREATE_COMMAND)

    assert schema_errors(document, "Command", message) == []
    assert parse_command(CREATE_COMMAND.encode()).command == "create"


def test_minimal_commands_are_valid(document):
    """Each command with only its required fields, relying on the defaults."""
    commands = [
        {"command": "create", "id": "a", "argv": ["true"]},
        {"command": "run", "id": "a", "argv": ["true"]},
        {"command": "start", "id": "a"},
        {"command": "stop", "id": "a"},
        {"command": "kill", "id": "a"},
        {"command": "delete", "id": "a"},
        {"command": "list"},
        {"command": "inspect", "id": "a"},
        {"command": "logs", "id": "a"},
    ]
    for message in commands:
        assert schema_errors(document, "Command", message) == [], message
        assert parse_command(json.dumps(message).encode()).command == message["command"]


def test_error_reply_is_valid(document):
    # The manager sends every field, null ones included (broker.reply).
    reply = Reply(
        request_id="5f0c2a9e7d3b4c1a",
        ok=False,
        error=ErrorInfo(
            code=ErrorCode.NOT_FOUND,
            message="no container 'web-1' on this manager; `list` shows the known ids",
        ),
    )
    message = json.loads(reply.model_dump_json())

    assert schema_errors(document, "Reply", message) == []
    assert message["error"]["code"] == "not_found"
    assert message["container"] is None


def test_error_reply_with_null_fields_is_valid(document):
    message = {
        "schema_version": 1,
        "request_id": None,
        "ok": False,
        "error": {"code": "bad_request", "message": "message is not JSON"},
        "container": None,
        "containers": None,
        "logs": None,
    }

    assert schema_errors(document, "Reply", message) == []


def test_event_with_exit_is_valid(document):
    # The manager stores and publishes events with model_dump_json() (store.save).
    event = Event(
        manager_id="host-a",
        container_id="web-1",
        sequence=4,
        event=ContainerState.EXITED.value,
        state=ContainerState.EXITED,
        exit=ExitInfo(
            exit_code=137,
            signal="SIGKILL",
            oom_killed=True,
            reason=ExitReason.OOM,
            finished_at=FINISHED_AT,
        ),
    )
    message = json.loads(event.model_dump_json())

    assert schema_errors(document, "Event", message) == []
    assert message["exit"]["reason"] == "oom"
    assert event_routing_key(event.manager_id, event.container_id, event.event) == (
        "host-a.web-1.exited"
    )


def test_reply_with_known_exit_is_valid(document):
    info = ContainerInfo(
        id="web-1",
        manager_id="host-a",
        state=ContainerState.EXITED,
        argv=["true"],
        heartbeat_timeout=30.0,
        created_at=FINISHED_AT,
        exit=ExitInfo(exit_code=0, reason=ExitReason.EXITED, finished_at=FINISHED_AT),
    )
    reply = Reply(request_id="r1", ok=True, container=info)
    message = json.loads(reply.model_dump_json())

    assert schema_errors(document, "Reply", message) == []


def test_reply_with_unknown_exit_code_is_valid(document):
    info = ContainerInfo(
        id="web-1",
        manager_id="host-a",
        state=ContainerState.EXITED,
        argv=["true"],
        heartbeat_timeout=30.0,
        created_at=FINISHED_AT,
        exit=ExitInfo(exit_code=None, reason=ExitReason.ASSISTANT_LOST, finished_at=FINISHED_AT),
    )
    reply = Reply(request_id="r1", ok=True, container=info)
    message = json.loads(reply.model_dump_json())

    assert schema_errors(document, "Reply", message) == []


def test_document_root_accepts_every_message_type(document):
    root = Draft202012Validator(document)
    samples = [
        json.loads(CREATE_COMMAND),
        {"ok": True},
        {
            "manager_id": "host-a",
            "container_id": "web-1",
            "sequence": 1,
            "event": "created",
            "state": "created",
        },
        {"container_id": "web-1", "assistant_pid": 4242, "token": "5e1f0c2a9b7d", "status": "running", "pid": 4250},
        {"verdict": "stop", "grace": 10.0},
        {"action": "kill", "signal": "SIGTERM"},
    ]
    for message in samples:
        assert list(root.iter_errors(message)) == [], message


# --- invalid messages --------------------------------------------------------

INVALID_COMMANDS = {
    "argv is a number": {"command": "create", "id": "web-1", "argv": 42},
    "argv is empty": {"command": "create", "id": "web-1", "argv": []},
    "id contains a dot": {"command": "start", "id": "web.1"},
    "id starts with a dash": {"command": "start", "id": "-web"},
    "id is 65 characters": {"command": "start", "id": "a" * 65},
    "unknown field": {"command": "start", "id": "web-1", "detach": True},
    "stop grace above 3600": {"command": "stop", "id": "web-1", "grace": 3601},
    "memory below 4 MiB": {
        "command": "create",
        "id": "web-1",
        "argv": ["true"],
        "limits": {"memory_bytes": 1024},
    },
    "relative cwd": {"command": "create", "id": "web-1", "argv": ["true"], "cwd": "tmp"},
    "logs tail above limit": {"command": "logs", "id": "web-1", "tail": 10_001},
    "list of unknown state": {"command": "list", "state": "paused"},
}


@pytest.mark.parametrize("case", INVALID_COMMANDS)
def test_invalid_command_is_rejected(document, case):
    message = INVALID_COMMANDS[case]

    assert schema_errors(document, "Command", message) != []
    with pytest.raises(BadMessage) as raised:
        parse_command(json.dumps(message).encode())
    assert raised.value.code == ErrorCode.INVALID_ARGUMENT


def test_argv_number_error_names_argv(document):
    message = INVALID_COMMANDS["argv is a number"]
    errors = list(validator_for(document, "Command").iter_errors(message))

    assert errors != []
    assert any("argv" in str(error) for error in errors)


@pytest.mark.parametrize(
    "message",
    [
        {"command": "pause", "id": "web-1"},
        {"id": "web-1"},
        {"command": "start", "id": "web-1", "schema_version": 2},
    ],
    ids=["unknown command", "missing command", "schema version 2"],
)
def test_unparsable_command_is_rejected(document, message):
    assert schema_errors(document, "Command", message) != []
    with pytest.raises(BadMessage):
        parse_command(json.dumps(message).encode())
