#!/usr/bin/env bash
# Install what berth needs on a Debian machine, as root: the Debian
# packages rabbitmq-server, runc and tini when missing, then the Python
# requirements and berth itself (editable, so `berth` and
# `berth-manager` are on PATH). Safe to run again.
set -euo pipefail

cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
APT_PACKAGES=(rabbitmq-server runc tini)

package_installed() {
    [[ "$(dpkg-query --show --showformat='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

# Stops the system-wide broker that the rabbitmq-server package may start
# (unless policy-rc.d forbids it), with the service's own stop command.
# berth starts private nodes of its own. Reading the pid file, not calling
# `status`, because `status` runs rabbitmqctl, which starts an epmd
# listening on every address.
stop_packaged_rabbitmq() {
    if command -v systemctl >/dev/null && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
        echo "stopping the rabbitmq-server service that the package started"
        systemctl stop rabbitmq-server
        return
    fi
    local pid_file=/var/run/rabbitmq/pid
    if [[ -x /etc/init.d/rabbitmq-server && -s "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        echo "stopping the rabbitmq-server service that the package started"
        /etc/init.d/rabbitmq-server stop
    fi
}

if [[ "$(id -u)" != 0 ]]; then
    echo "deploy/setup.sh: run as root: it installs Debian packages, and berth needs root for runc" >&2
    exit 1
fi

missing=()
for package in "${APT_PACKAGES[@]}"; do
    if ! package_installed "$package"; then
        missing+=("$package")
    fi
done

if ((${#missing[@]} > 0)); then
    echo "installing missing Debian packages: ${missing[*]}"
    apt-get update -q
    apt-get install --yes --no-install-recommends -q "${missing[@]}"
    if [[ " ${missing[*]} " == *" rabbitmq-server "* ]]; then
        stop_packaged_rabbitmq
    fi
fi

python3 -m pip install -q -r requirements.txt
python3 -m pip install -q -e .
