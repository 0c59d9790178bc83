#!/usr/bin/env bash
# The main job: run real containers through a real broker and show their
# events and logs, then clean up. Run as root on Debian:
#
#   bash deploy/demo.sh
#
# Uses the broker in AMQP_URL when set; otherwise starts a private
# RabbitMQ node on 127.0.0.1 in a temporary directory and stops it at the end.
set -euo pipefail

cd "$(dirname "$0")/.."
bash deploy/setup.sh

workdir=$(mktemp -d /tmp/berth-demo.XXXXXX)
chmod 755 "$workdir"  # the private node runs as the rabbitmq user
manager_id="demo-$$"
runc_root="/run/berth-demo-$$"
manager_pid=""
events_pid=""
node_started=""

cleanup() {
    set +e
    [[ -n "$events_pid" ]] && kill "$events_pid" 2>/dev/null
    if [[ -n "$manager_pid" ]]; then
        kill -TERM "$manager_pid" 2>/dev/null
        wait "$manager_pid" 2>/dev/null
    fi
    [[ -n "$node_started" ]] && python3 -m deploy.rabbitmq stop "$workdir/rabbitmq" >/dev/null 2>&1
    rm -rf "$workdir" "$runc_root"
}
trap cleanup EXIT

step() { printf '\n==> %s\n' "$*"; }

if [[ -z "${AMQP_URL:-}" ]]; then
    step "starting a private RabbitMQ node"
    AMQP_URL=$(python3 -m deploy.rabbitmq start "$workdir/rabbitmq" 2>"$workdir/rabbitmq.log")
    node_started=1
fi
export BERTH_AMQP_URL="$AMQP_URL"
export BERTH_MANAGER="$manager_id"

step "starting manager $manager_id (log: $workdir/manager.log)"
berth-manager --id "$manager_id" --state-dir "$workdir/state" --runc-root "$runc_root" \
    >"$workdir/manager.log" 2>&1 &
manager_pid=$!
for _ in $(seq 1 60); do
    berth ps >/dev/null 2>&1 && break
    kill -0 "$manager_pid" 2>/dev/null || { cat "$workdir/manager.log"; exit 1; }
    sleep 0.5
done

# Two containers produce 11 events: hello 5 (created, starting, running,
# exited, deleted) and sleeper 6 (the same plus stopping).
berth events --count 11 "$manager_id.#" >"$workdir/events.txt" &
events_pid=$!
sleep 1

step "berth run hello -- sh -c '...; exit 3'"
berth run hello -- sh -c 'echo "hello from $(hostname)"; echo "this line went to stderr" >&2; exit 3'
sleep 1

step "berth run --memory 64m sleeper -- sleep infinity"
berth run --memory 64m sleeper -- sleep infinity

step "berth ps --all"
berth ps --all

step "berth logs hello"
berth logs hello

step "berth stop --grace 5 sleeper"
berth stop --grace 5 sleeper

step "berth inspect sleeper"
berth inspect sleeper

step "berth rm hello; berth rm sleeper"
berth rm hello
berth rm sleeper

wait "$events_pid" || true
events_pid=""
step "events published on berth.events"
cat "$workdir/events.txt"

step "done: stopping the manager and cleaning up"
