"""The same app on Ray Serve: each replica builds its own :func:`~llada_edge.serve.app.create_app` (its own
scheduler and pipelines, hence its own engines and KV caches), with its CPU/GPU resources declared.

On one machine ``llada-edge serve --ray --replicas 2`` starts a local Ray instance. On a cluster, an operator
applies a config file (``llada-edge serve --ray --write-config serve.yaml`` writes one) with ``serve deploy``;
its ``import_path`` is :func:`app_builder` and its ``args`` are :class:`~llada_edge.serve.config.ServeConfig`'s
fields plus ``replicas``, ``num_cpus`` and ``num_gpus`` per replica. Ray restarts a replica that dies; its
in-flight requests get a 5xx from Ray's proxy, the others go on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llada_edge.errors import InputError
from llada_edge.serve.config import ServeConfig

DEPLOYMENT = "LladaEdge"
APP_NAME = "llada-edge"


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    num_cpus: float = 1.0  # per replica: a worker's ONNX Runtime threads should not exceed it
    num_gpus: float = 0.0  # per replica (1 for a TensorRT build on a GPU node)

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.num_cpus < 0 or self.num_gpus < 0:
            raise InputError(f"replicas must be >= 1 and resources >= 0, got {self}")


def _require_ray() -> Any:
    try:
        from ray import serve
    except ImportError as exc:
        raise InputError("--ray needs Ray Serve: pip install 'llada-edge[serve]' (ray[serve])") from exc
    return serve


def deployment(config: ServeConfig, ray: RayOptions) -> Any:
    """A bound Ray Serve application: ``ray.replicas`` replicas of the llada-edge app."""
    serve = _require_ray()

    @serve.ingress()
    class LladaEdge:
        """One replica: the app is built after the constructor, in the replica's own process."""

        def __init__(self, config_dict: dict[str, Any]) -> None:
            self.config = ServeConfig.from_dict(config_dict)
            self.asgi: Any = None  # (`app` is taken: the ingress wrapper defines it)

        def __serve_build_asgi_app__(self) -> Any:
            from llada_edge.serve.app import create_app

            self.asgi = create_app(self.config)
            return self.asgi

        def check_health(self) -> None:
            """Ray's health probe: a replica whose engines failed to load is replaced."""
            if self.asgi is not None and self.asgi.state.server.scheduler.load_error is not None:
                raise RuntimeError(f"engines failed to load: {self.asgi.state.server.scheduler.load_error}")

    actor_options = {"num_cpus": ray.num_cpus, "num_gpus": ray.num_gpus}
    # One request more than a replica holds reaches it, to be answered 429 at once by its own bounded queue:
    # Ray's router then never parks requests in a queue of its own, unbounded and invisible to /metrics.
    wrapped = serve.deployment(LladaEdge, name=DEPLOYMENT, num_replicas=ray.replicas,
                               ray_actor_options=actor_options, health_check_period_s=2,
                               max_ongoing_requests=config.workers + config.queue_size + 1)
    if config.threads is None and ray.num_cpus >= 1:  # the replica's declared CPUs, not the node's
        config = replace(config, threads=max(1, int(ray.num_cpus) // config.workers))
    return wrapped.bind(config.to_dict())


def replica_pids() -> list[int]:
    """Process ids of this machine's llada-edge replicas (Ray titles them ``ray::ServeReplica:<app>:<deployment>``):
    what an operator (or the fault tests) signals to take one replica down."""
    import psutil

    title = f"ServeReplica:{APP_NAME}:{DEPLOYMENT}"
    return sorted(proc.pid for proc in psutil.process_iter(["cmdline"])
                  if any(title in part for part in (proc.info["cmdline"] or [])[:1]))


def app_builder(args: dict[str, Any]) -> Any:
    """``import_path`` of a Ray Serve config file: ``args`` are ServeConfig's fields and RayOptions'."""
    ray_fields = {key: args[key] for key in ("replicas", "num_cpus", "num_gpus") if key in args}
    config = {key: value for key, value in args.items() if key not in ray_fields}
    return deployment(ServeConfig.from_dict(config), RayOptions(**ray_fields))


def config_file(config: ServeConfig, ray: RayOptions, host: str, port: int) -> str:
    """A Ray Serve config (YAML is a superset of JSON; written as JSON so no YAML library is needed)."""
    import json

    args = {**config.to_dict(), "model": str(Path(config.model).resolve()), "replicas": ray.replicas,
            "num_cpus": ray.num_cpus, "num_gpus": ray.num_gpus}
    document = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
                "applications": [{"name": APP_NAME, "route_prefix": "/",
                                  "import_path": "llada_edge.serve.ray_app:app_builder", "args": args}]}
    return json.dumps(document, indent=2) + "\n"


def run(config: ServeConfig, ray_options: RayOptions, host: str, port: int) -> None:
    """Start a local Ray instance (or join RAY_ADDRESS), run the app on ``host:port`` until Ctrl-C or SIGTERM,
    then take the application down and stop the Ray instance this call started (a second signal during that
    shutdown is ignored: an interrupted ``ray.shutdown`` leaves Ray's agent processes behind)."""
    serve = _require_ray()
    import signal

    import ray

    started_here = not ray.is_initialized() and "RAY_ADDRESS" not in os.environ
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    # Ctrl-C and SIGTERM both raise KeyboardInterrupt here, set explicitly (as uvicorn does): a process started in
    # the background by a non-interactive shell inherits SIGINT ignored, and Python then installs no handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(config, ray_options), name=APP_NAME, route_prefix="/", blocking=False)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if started_here:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)
