"""Benchmarks of berth against raw runc, podman and bare pika: ``python3 -m bench.run``."""
