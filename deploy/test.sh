#!/usr/bin/env bash
# Install what the tests need, then run them: `bash deploy/test.sh [pytest options]`.
# The tests start a private RabbitMQ node unless AMQP_URL is set.
set -euo pipefail

cd "$(dirname "$0")/.."
bash deploy/setup.sh

status=0
python3 -m pytest --durations=15 "$@" || status=$?

# pytest exits with 5 when it collected no test at all.
if ((status == 5)); then
    echo "no tests collected"
    exit 0
fi
exit "$status"
