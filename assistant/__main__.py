"""Entry point: ``python -m assistant CONTAINER_DIR``, started by the manager."""

import logging
import sys
from pathlib import Path

from assistant.config import CONFIG_NAME, AssistantConfig
from assistant.supervisor import AssistantExit, Supervisor

log = logging.getLogger("assistant")


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    logging.getLogger("pika").setLevel(logging.WARNING)
    if len(argv) != 1:
        log.error("usage: python -m assistant CONTAINER_DIR")
        return 2
    config_path = Path(argv[0]) / CONFIG_NAME
    try:
        config = AssistantConfig.model_validate_json(config_path.read_text())
    except (OSError, ValueError) as exc:
        log.error("cannot load %s: %s", config_path, exc)
        return 2

    supervisor = Supervisor(config)
    try:
        return supervisor.run()
    except AssistantExit as exc:
        log.error("container %s: %s", config.container_id, exc)
    except BaseException:  # KeyboardInterrupt included: never leave the workload behind
        log.exception("container %s: assistant failed", config.container_id)
    # Never leave the workload running without a supervisor.
    supervisor.kill_workload_now()
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
