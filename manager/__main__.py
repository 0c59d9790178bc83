"""Command line of the manager daemon: ``python -m manager`` or ``berth-manager``."""

import logging
import os
import shutil
from pathlib import Path

import click

from manager.config import ManagerConfig
from manager.daemon import Manager
from messages.brokers import check_urls


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@click.option(
    "--amqp-url",
    envvar=["BERTH_AMQP_URL", "AMQP_URL"],
    required=True,
    help="Broker URL, e.g. amqp://user:password@host:5672/%2F"
    " (env BERTH_AMQP_URL or AMQP_URL).",
)
@click.option("--id", "manager_id", envvar="BERTH_MANAGER_ID", help="Manager id; default: the host name.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path("/var/lib/berth"), help="Directory for state, bundles and logs.")
@click.option("--runc", "runc_binary", default="runc", help="OCI runtime binary.")
@click.option("--runc-root", type=click.Path(path_type=Path), default=Path("/run/berth/runc"), help="runc state directory (a tmpfs).")
@click.option("--init-binary", default="/usr/bin/tini-static", help="Static init run as each container's pid 1 unless a create sets init false.")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.01, max=3600), default=1.0, help="Seconds between assistant heartbeats.")
@click.option("--heartbeat-timeout", type=click.FloatRange(min=0, max=365 * 24 * 3600), default=30.0, help="Default seconds without a reply before an assistant kills its workload; 0: never.")
@click.option("--adopt-window", type=click.FloatRange(min=0, max=3600), default=5.0, help="Seconds after start during which heartbeats of unknown containers get retry_later instead of nack.")
@click.option("--lost-after", type=click.FloatRange(min=0.1, max=3600), default=5.0, help="Seconds without a heartbeat before a container is lost.")
@click.option("--spawn", "spawn_mode", type=click.Choice(["fork", "exec"]), default="fork", help="Start assistants by forking a process that has their code loaded, or by exec of a new interpreter.")
@click.option("--workers", type=click.IntRange(1, 256), default=8, help="Threads handling commands.")
@click.option("--connect-timeout", type=click.FloatRange(min=0), default=60.0, help="Seconds to keep retrying an unreachable broker before exiting; 0: retry forever.")
@click.option("--network-subnet", help="IPv4 subnet of the container bridge, e.g. 10.213.7.0/24; default: a free /24 of 10.213.0.0/16.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO")
def main(amqp_url, manager_id, state_dir, runc_binary, runc_root, init_binary, heartbeat_interval,
         heartbeat_timeout, adopt_window, lost_after, spawn_mode, workers, connect_timeout, network_subnet,
         log_level) -> None:
    """Run the berth manager for this host until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=log_level,
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
    )
    logging.getLogger("pika").setLevel(logging.WARNING)
    # pika logs each failed connection attempt with a traceback at ERROR;
    # the manager logs every attempt itself, with the next wait.
    logging.getLogger("pika.adapters.utils.connection_workflow").setLevel(logging.CRITICAL)
    logging.getLogger("pika.adapters.blocking_connection").setLevel(logging.CRITICAL)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # DEBUG logs every netlink message
    try:
        check_urls(amqp_url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--amqp-url'") from None
    options = {"manager_id": manager_id} if manager_id else {}
    try:
        config = ManagerConfig(
            amqp_url=amqp_url,
            state_dir=state_dir,
            runc_binary=runc_binary,
            runc_root=runc_root,
            init_binary=init_binary,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            adopt_window=adopt_window,
            lost_after=lost_after,
            spawn_mode=spawn_mode,
            workers=workers,
            network_subnet=network_subnet,
            **options,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if os.geteuid() != 0:
        raise click.UsageError("the manager must run as root: runc needs it to create containers")
    if shutil.which(runc_binary) is None:
        raise click.UsageError(
            f"OCI runtime {runc_binary!r} not found: install runc (apt-get install runc)"
            " or give its path with --runc"
        )
    try:
        config.containers_dir.mkdir(parents=True, exist_ok=True)
        config.manager_runc_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.UsageError(
            f"cannot create the state directories ({exc}): give writable directories"
            " with --state-dir and --runc-root"
        ) from None
    raise SystemExit(Manager(config, connect_timeout=connect_timeout).run())


if __name__ == "__main__":
    main()
