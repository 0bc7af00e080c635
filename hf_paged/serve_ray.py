"""Replicas under Ray Serve: the hf_paged server app as a Ray Serve deployment.

Each replica is one engine (one ``PagedPipeline`` and its own KV pool) serving the same TGI and
OpenAI routes as ``hf-paged serve``; Ray's HTTP proxy spreads the requests over the replicas and
Ray Serve's autoscaler adds or removes them. Every answer names its replica in the
``x-hf-paged-replica`` header. Needs the ``ray`` extra (``pip install "hf-paged[ray]"``).

Example::

    import ray, hf_paged.serve_ray as sr
    ray.init()
    sr.serve_ray("/models/llama", num_replicas=2, engine={"kv_memory": "2GiB"})   # http://127.0.0.1:8000
    # autoscaling instead: autoscaling_config={"min_replicas": 1, "max_replicas": 4,
    #                                           "target_ongoing_requests": 32}
"""
from __future__ import annotations

from typing import Any

_REPLICA: dict[str, Any] = {}  # this process's replica app (Ray Serve runs each replica in its own actor)


def check_replica() -> None:
    """Ray Serve's health check of this replica: it raises once the engine stopped (its thread died, or its
    tensor-parallel group broke). Such a replica answers every request with 503 and never recovers; Ray's proxy
    does not read ``/health``, but it replaces a replica whose check fails."""
    app = _REPLICA.get("app")
    if app is not None and not app.state.hf_paged.pipe.alive:
        raise RuntimeError("hf_paged: this replica's engine has stopped: "
                           f"{app.state.hf_paged.pipe._broken or 'its thread ended'}")


def _build_app(model: str, engine: dict, server: dict, model_id: str | None) -> Any:
    """Runs on each replica: load the model, build the pipeline and the app (no UI)."""
    from ray import serve

    from .engine.pipeline import PagedPipeline
    from .models import DEFAULT_MODEL_NAME
    from .server import create_app

    pipe = PagedPipeline.from_pretrained(model, **engine)
    name = model_id or (DEFAULT_MODEL_NAME if model == "default" else model)
    app = create_app(pipe, model_id=name, ui=False, **server)
    ctx = serve.get_replica_context()
    replica = str(getattr(ctx, "replica_id", None) or getattr(ctx, "replica_tag", "?"))
    replica = getattr(getattr(ctx, "replica_id", None), "unique_id", None) or replica

    @app.middleware("http")
    async def name_the_replica(request, call_next):
        response = await call_next(request)
        response.headers["x-hf-paged-replica"] = replica
        return response

    _REPLICA["app"] = app
    return app


def deployment(model: str = "default", *, engine: dict | None = None, server: dict | None = None,
               model_id: str | None = None, num_replicas: int | None = 1,
               autoscaling_config: dict | None = None, ray_actor_options: dict | None = None,
               max_ongoing_requests: int | None = None) -> Any:
    """The Ray Serve application (``Deployment.bind()``) of ``model``.

    ``engine``: :class:`~hf_paged.config.EngineConfig` fields (and ``dtype``/``device``; not ``tp_plan``);
    ``server``: ``create_app`` options (``max_concurrent_requests``, ``api_key``, ...). Give
    ``num_replicas`` or ``autoscaling_config`` (then ``num_replicas`` is ignored). ``max_ongoing_requests``
    (Ray's per-replica limit) defaults to the app's ``max_concurrent_requests`` (128): with more, Ray would send a
    replica requests its app answers 429 while another replica is idle.
    """
    engine, server = dict(engine or {}), dict(server or {})
    if engine.get("tp_plan") is not None:
        raise ValueError("engine: tp_plan is not supported under Ray Serve (a replica is one process, with no ranks "
                         "to shard over): serve a tensor-parallel model with hf-paged serve --tensor-parallel-size")
    from ray import serve

    def builder() -> Any:  # a plain function: Ray Serve calls it on each replica (a partial looks like an app)
        return _build_app(model, engine, server, model_id)

    if max_ongoing_requests is None:
        from .server.app import DEFAULT_MAX_CONCURRENT_REQUESTS

        max_ongoing_requests = int(server.get("max_concurrent_requests", DEFAULT_MAX_CONCURRENT_REQUESTS))
    options: dict[str, Any] = {"max_ongoing_requests": max_ongoing_requests,
                               "ray_actor_options": ray_actor_options or {"num_cpus": 1}}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas

    @serve.deployment(name="hf_paged", **options)
    @serve.ingress(builder)
    class HFPaged:
        def check_health(self) -> None:
            from hf_paged.serve_ray import check_replica

            check_replica()

    return HFPaged.bind()


def serve_ray(model: str = "default", *, route_prefix: str = "/", name: str = "hf_paged", blocking: bool = False,
              **options: Any) -> Any:
    """Deploy :func:`deployment` on the connected Ray cluster (``ray.init()`` first, or one is started);
    returns the deployment handle. HTTP on Ray Serve's proxy (port 8000 unless ``serve.start`` said
    otherwise)."""
    from ray import serve

    return serve.run(deployment(model, **options), name=name, route_prefix=route_prefix, blocking=blocking)
