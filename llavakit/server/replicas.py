"""`llavakit serve --replicas N`: the one-process server's app on N engine replicas, with Ray Serve.

    this process (`llavakit serve`)                         the Ray cluster (local, or --ray-address)
    ┌──────────────────────────────────────┐                ┌────────────────────────────────────────┐
    │ front.py: uvicorn, limits, guard,    │  request, key  │ EngineReplica × N (Ray Serve replicas): │
    │ /health, /metrics                    │ ─────────────► │ the model, an AsyncEngine (its own KV,  │
    │ MediaAffinityRouter (in the handle)  │ ◄───────────── │ prefix and image caches) and create_app │
    └──────────────────────────────────────┘  ASGI messages └────────────────────────────────────────┘

On /metrics the front asks each replica the router knows for its own metrics (a call routed to
that replica by id) and adds them up (front.merge_reports).

Routing: a request's key is a hash of its first image or video URL (front.affinity_key). The
router ranks replicas for a key by rendezvous hashing (highest hash of key and replica id first),
so a key keeps its replica while replicas come and go, and sends the request to the first one in
that order whose load is under a bound: `balance` (1.25) times the average load, counting this
request (consistent hashing with bounded loads, Mirrokni et al. 2018): a popular picture spills to
its second replica instead of queueing behind a full one. A request without media goes to the less
loaded of two random replicas (Ray Serve's default policy).

With --tensor-parallel-size N, each replica is rank 0 of its own N ranks, started by it on its node
(EngineReplica); Ray reserves N times the per-rank CPUs and GPUs for each replica (ReplicaOptions).

Ray is imported only here, and only `llavakit serve` with replicas imports this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ..errors import ConfigError, LlavakitError, ParallelError
from .asgi import error_response
from .config import ServerConfig
from .errors import InternalError, Overloaded, TooManyRequests, log
from .front import Forwarded, Front, ReplicaReport, run_asgi
from .guard import is_loopback_host
from .run import run_uvicorn

RAY_HINT = "pip install 'llavakit[ray]'"
_REPORT_TIMEOUT_S = 3.0  # a replica too busy to report this fast keeps its last report
_TARGET = "replica:"  # a routing key naming one replica (media keys are hex digests)
# The replica ids each app's router knows, keyed by app name. Ray Serve builds the router inside the
# front's deployment handle, in this process; this is how the front learns whom to ask for metrics.
_REPLICA_IDS: dict[str, list[str]] = {}
_TEARDOWN_TIMEOUT_S = 20.0  # joined clusters: for Serve to delete our replicas
_RANK_HEALTH_CHECK_S = 2.0  # Serve's health-check period for replicas with tensor-parallel ranks (its default: 10)

try:
    from ray.serve.request_router import RequestRouter
except ImportError:  # reported by _import_ray() when serving with replicas is asked for
    RequestRouter = object


class RayMissing(LlavakitError):
    """Replicas were asked for but Ray Serve is not installed."""


class RayStartError(LlavakitError):
    """Ray could not start, or the cluster could not be joined."""


class ReplicaStartError(LlavakitError):
    """The replicas could not be started (the model failed to load on them, say)."""


@dataclass(frozen=True)
class ReplicaOptions:
    """How many engine replicas, where, and how big. `llavakit serve` maps each field to a flag."""

    replicas: int = 1  # replicas at start (--replicas); with autoscaling, between min and max
    ray_address: str | None = None  # a cluster to join; None: a local one, started here and stopped on exit
    # Per rank: a replica of tensor_parallel_size N reserves N times each (see replica_cpus, replica_gpus).
    num_cpus_per_replica: float = 1.0  # Ray's CPU share (also the torch threads, when --threads is not set)
    num_gpus_per_replica: float = 0.0  # > 0: the replica runs the model on cuda
    min_replicas: int | None = None  # autoscaling bounds; None: a fixed count
    max_replicas: int | None = None
    media_affinity: bool = True  # route requests by their first medium (False: by load alone)
    tensor_parallel_size: int = 1  # ranks per replica: the replica's process is rank 0 and starts the others

    def __post_init__(self):
        for name in ("replicas", "min_replicas", "max_replicas", "tensor_parallel_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= 0, got {value!r}.")
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be 1 or more, got {self.replicas}.")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be 1 or more, got {self.tensor_parallel_size}.")
        if self.tensor_parallel_size > 1 and self.num_gpus_per_replica not in (0, 1):
            # Rank r runs on the replica's r-th GPU: a fraction cannot hold a rank, and a second GPU per
            # rank would sit idle.
            raise ConfigError(f"with --tensor-parallel-size {self.tensor_parallel_size}, --num-gpus-per-replica is "
                              f"per rank and must be 0 or 1 (each rank runs on one whole GPU), got "
                              f"{self.num_gpus_per_replica:g}.")
        if self.num_cpus_per_replica <= 0 or self.num_gpus_per_replica < 0:
            raise ConfigError("--num-cpus-per-replica must be > 0 and --num-gpus-per-replica >= 0, got "
                              f"{self.num_cpus_per_replica} and {self.num_gpus_per_replica}.")
        if self.min_replicas is not None and self.max_replicas is None:
            raise ConfigError("--min-replicas needs --max-replicas (the autoscaling bounds go together).")
        if self.max_replicas is not None:
            low = 1 if self.min_replicas is None else self.min_replicas
            if not low <= self.replicas <= self.max_replicas or self.max_replicas < 1:
                raise ConfigError(f"autoscaling needs --min-replicas <= --replicas <= --max-replicas and "
                                  f"--max-replicas >= 1; got {low}, {self.replicas} and {self.max_replicas}.")

    @property
    def autoscaling(self) -> bool:
        """Whether Ray Serve sizes the deployment between min_replicas and max_replicas."""
        return self.max_replicas is not None

    @property
    def most(self) -> int:
        """The most replicas that can run at once."""
        return self.max_replicas if self.autoscaling else self.replicas

    @property
    def replica_cpus(self) -> float:
        """The CPUs Ray reserves for one replica: its share for each of its tensor-parallel ranks, which run
        in processes Ray does not know of (as vLLM on Ray Serve reserves one bundle per rank)."""
        return self.num_cpus_per_replica * self.tensor_parallel_size

    @property
    def replica_gpus(self) -> float:
        """The GPUs Ray reserves for one replica: one per rank when on GPUs (all on one node, as one actor's
        resources are; the replica's CUDA_VISIBLE_DEVICES, inherited by its ranks, lists them)."""
        return self.num_gpus_per_replica * self.tensor_parallel_size


def _import_ray():
    try:
        import ray
        from ray import serve
        from ray.serve.request_router import RequestRouter  # noqa: F401  (Ray 2.60's router API)
    except ImportError as e:
        raise RayMissing(f"serving with replicas needs Ray Serve: {RAY_HINT} ({e}).") from e
    return ray, serve


# ───────────────────────────── routing ─────────────────────────────


def rank(key: str, replica_ids: list[str]) -> list[str]:
    """Replica ids in the order a key prefers them (rendezvous hashing: removing a replica moves only
    the keys it was first for, and adding one takes only the keys it now wins)."""
    def weight(replica: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


def publish_replicas(app: str, replica_ids: list[str]) -> None:
    """Record the replicas the router of `app` knows (MediaAffinityRouter calls it)."""
    _REPLICA_IDS[app] = replica_ids


class MediaAffinityRouter(RequestRouter):
    """Ray Serve request router: see the module docstring. It runs in the front's deployment handle.

    Configured with `balance` (how far above the average load a replica may be and still take the
    keys it comes first for) and `app`, the name under which it publishes the replica ids it knows
    (_REPLICA_IDS). A key `replica:ID` goes to that replica only.
    """

    def initialize_state(self, balance: float = 1.25, app: str = "", **kwargs):
        """Called by Ray Serve with RequestRouterConfig.request_router_kwargs."""
        self.balance, self.app = balance, app

    def update_replicas(self, replicas):
        """Called by Ray Serve when replicas start or stop."""
        super().update_replicas(replicas)
        # Ray Serve gives the handle a copy of this class pickled by value, module globals and all: the
        # import statement reaches the real module, whose registry the front reads.
        from llavakit.server.replicas import publish_replicas

        publish_replicas(self.app, [r.replica_id.unique_id for r in replicas])

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        """Ranks of replicas to try in turn: the key's first replica under the load bound, then two random ones."""
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # when every replica is full, retry with backoff
        two = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if not key:
            return [two]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if key.startswith(_TARGET):
            target = by_id.get(key[len(_TARGET):])
            return [[target]] if target is not None else []
        # Requests in flight per replica, as this handle counts them (sent and not yet finished).
        load = {i: self.replica_queue_len_cache.get(r.replica_id) or 0 for i, r in by_id.items()}
        bound = math.ceil(self.balance * (sum(load.values()) + 1) / len(load))
        for replica_id in rank(key, list(by_id)):
            if load[replica_id] < bound:
                return [[by_id[replica_id]], two]
        return [two]


# ───────────────────────────── on the cluster ─────────────────────────────


def _rss(pid: int | str = "self") -> int:
    """A process's resident memory in bytes (0 where /proc is missing or the process is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# Set by torchrun for the processes it starts. A replica always starts its own ranks: inherited from
# whatever started Ray, they would make llavakit.load wait to join a torchrun world that is not there.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _log_rank_failure(reason: str) -> None:
    log.error("%s; this replica cannot run its model any more: Ray Serve replaces it when its health check fails.",
              reason)


class EngineReplica:
    """One replica: loads the model, starts its engine and the one-process app, and answers forwarded
    requests with that app. Ray Serve makes it a deployment (see serve_replicas).

    With tensor-parallel ranks, this process is rank 0 of its own group: `load` starts the other ranks
    as its child processes (subprocesses, so a Ray actor may start them; they meet on a TCPStore at
    127.0.0.1 on a port the OS picks, so replicas on one node never clash). They end with it: Ray Serve
    calls __del__ (which stops them) on a graceful stop, and when the actor is killed instead, each
    rank sees the pipe this process held close and exits. A rank that dies or hangs fails the
    replica's health check, and Ray Serve replaces the replica, ranks and all.
    """

    def __init__(self, load: Callable, config: ServerConfig, loopback: bool, engine: dict, device: str):
        """load() -> a VLM (the CLI's loader with the serve flags: a tensor-parallel one is placed on
        `device` as it loads); engine: EngineConfig's fields."""
        import ray
        from ray import serve

        from ..engine.async_engine import AsyncEngine, EngineConfig
        from .app import create_app

        for name in _TORCHRUN_ENV:
            os.environ.pop(name, None)
        # Without --threads, the torch threads are Ray's OMP_NUM_THREADS for this actor: the floor of the CPUs
        # it reserved, T x per rank, which launch.py divides among the T ranks it starts.
        self.vlm = vlm = load()
        if vlm.parallel is not None:
            vlm.parallel.on_failure = _log_rank_failure  # not the command line's: that one stops the process
        elif device != "cpu":
            vlm.model.to(device)
        self.config = config
        self.engine = AsyncEngine(vlm, EngineConfig(**engine))
        self.app = create_app(self.engine, config, loopback)
        self.identity = {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                         "node": ray.util.get_node_ip_address()}

    def _rank_failure(self) -> str | None:
        """Why this replica's tensor-parallel group cannot run any more (None while it can, or without one)."""
        return None if self.vlm.parallel is None else self.vlm.parallel.failed

    async def check_health(self) -> None:
        """Ray Serve's health check: raises ParallelError once a rank has died or hung, so that Serve
        stops this replica (its ranks with it) and starts another."""
        reason = self._rank_failure()
        if reason is not None:
            raise ParallelError(f"{reason}; this replica cannot run its model any more and is being replaced.")

    async def call(self, request: Forwarded) -> AsyncIterator[dict]:
        """The ASGI messages of the app's answer to `request`, as they are sent."""
        app = self.app
        if self._rank_failure() is not None:
            # Until Serve replaces it, answer at once (503 with Retry-After: the client may retry on a
            # healthy replica) instead of failing each request inside the engine.
            app = error_response(Overloaded("a tensor-parallel rank of the replica answering this request "
                                            "failed; it is being replaced. Retry."), self.config.retry_after_s)
        async for message in run_asgi(app, request):
            yield message

    async def report(self) -> dict:
        """This replica's id, pid, node, resident memory and /metrics text, and with tensor-parallel ranks
        each rank's (rank, pid, resident memory), rank 0 being this process."""
        ranks = []
        if self.vlm.parallel is not None:
            ranks = [(0, os.getpid(), _rss())] + [
                (rank, p.pid, _rss(p.pid)) for rank, p in enumerate(self.vlm.parallel.workers, start=1)]
        return dict(self.identity, rss=_rss(), ranks=ranks, text=self.app.state.metrics.render().decode())

    async def __del__(self):
        # Ray Serve calls this when the replica stops, after its requests have ended (or timed out),
        # and also when __init__ failed halfway (a group that failed to start has stopped its ranks).
        if hasattr(self, "app"):
            await self.engine.stop(timeout=0.0)
            self.app.state.service.pool.shutdown(wait=False, cancel_futures=True)
        if hasattr(self, "vlm"):
            # Stops the other ranks (a STOP command; killed after a few seconds): off the event loop.
            await asyncio.to_thread(self.vlm.close)


# ───────────────────────────── in the front ─────────────────────────────


class RayBackend:
    """The front's way to the replicas: a Ray Serve deployment handle, routed by MediaAffinityRouter."""

    def __init__(self, handle, app: str):
        self.handle, self.app = handle, app
        self.last: dict[str, tuple[float, dict]] = {}  # replica id -> (when, its latest report)

    async def stream(self, request: Forwarded, key: str) -> AsyncIterator[dict]:
        """A replica's ASGI messages for `request`; Ray's failures become the API errors to answer."""
        import ray
        from ray.serve.exceptions import BackPressureError

        options = {"stream": True, "method_name": "call"}
        if key:
            options["session_id"] = key
        response = None
        try:
            response = self.handle.options(**options).remote(request)
            async for message in response:
                yield message
        except BackPressureError:
            raise TooManyRequests("every replica is busy and the queue for them is full "
                                  "(--max-concurrent-requests per replica); retry shortly.") from None
        except ray.exceptions.RayActorError:  # killed, crashed or unreachable
            raise Overloaded("the replica answering this request stopped; it is being replaced. Retry.") from None
        except ray.exceptions.RayTaskError as e:
            log.error("a replica failed on a request: %s", e)
            raise InternalError("internal server error; the server log has the details.") from None
        except ray.exceptions.RayError as e:
            log.warning("no replica could answer: %s", e)
            raise Overloaded("no replica could take the request; retry shortly.") from None
        finally:
            if response is not None:  # the client left or the front cut it: stop the replica's work (no-op when done)
                response.cancel()

    async def reports(self) -> list[ReplicaReport]:
        """Every replica's latest report: asked now of the running ones; a replica that has gone (or did not
        answer in time) keeps its last one, growing older."""
        async def ask(replica: str) -> None:
            response = self.handle.options(method_name="report", session_id=_TARGET + replica).remote()
            try:
                self.last[replica] = (time.monotonic(), await asyncio.wait_for(response, _REPORT_TIMEOUT_S))
            except Exception as e:
                response.cancel()
                log.debug("replica %s did not report: %s", replica, e)

        await asyncio.gather(*(ask(r) for r in _REPLICA_IDS.get(self.app, ())))
        now = time.monotonic()
        return [ReplicaReport(r["replica"], r["pid"], r["node"], r["rss"], r["text"], now - at,
                              tuple(tuple(x) for x in r.get("ranks", ()))) for at, r in self.last.values()]


class _Stop(Exception):
    """SIGTERM while starting."""


def _raise_stop(signum, frame):
    raise _Stop


def serve_replicas(load: Callable, model: str, config: ServerConfig, options: ReplicaOptions,
                   host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 16,
                   kv_cache_bytes: int | None = None, image_cache_bytes: int = 256 << 20,
                   log_level: str = "info") -> int:
    """Serve with replicas until SIGTERM or SIGINT; returns the exit status (0 after a graceful stop).

    load: builds the VLM on each replica (picklable: it travels to them); model: its name or folder,
    for messages. Starts (or joins) the Ray cluster, deploys the replicas, serves the front here, and
    on the way out deletes the replicas and stops the cluster it started. SIGTERM while starting
    stops what has started and returns 0.
    """
    ray, serve = _import_ray()
    say = print if log_level in ("info", "debug") else (lambda *a, **k: None)
    ray_level = logging.INFO if log_level == "debug" else logging.WARNING
    engine = dict(max_batch_size=max_batch_size, max_queue=config.max_concurrent_requests,
                  kv_cache_bytes=kv_cache_bytes, image_cache_bytes=image_cache_bytes)
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        say(f"[llavakit] {'joining ' + options.ray_address if options.ray_address else 'starting a local Ray cluster'}",
            file=sys.stderr)
        _start_ray(ray, options, ray_level)
        app_name = f"llavakit-{uuid.uuid4().hex[:8]}"
        try:
            started = time.monotonic()
            handle = _deploy(ray, serve, app_name, load, model, config, options, is_loopback_host(host), engine,
                             ray_level)
            say(f"[llavakit] {options.replicas} replica(s) of {model} ready in {time.monotonic() - started:.1f} s"
                f"{_reservation(options)}", file=sys.stderr)
            front = Front(RayBackend(handle, app_name), config, is_loopback_host(host), options.media_affinity)
            return run_uvicorn(front, front.drain, config, host, port, log_level, lifespan="off")
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
            _teardown(ray, serve, app_name, options.ray_address is None)
    except _Stop:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _reservation(options: ReplicaOptions) -> str:
    """', each on N tensor-parallel ranks, reserving C CPUs (and G GPUs)' ("" without ranks)."""
    if options.tensor_parallel_size == 1:
        return ""
    gpus = f" and {options.replica_gpus:g} GPUs" if options.replica_gpus else ""
    return (f", each on {options.tensor_parallel_size} tensor-parallel ranks, reserving {options.replica_cpus:g} "
            f"CPUs{gpus}")


def _start_ray(ray, options: ReplicaOptions, ray_level: int) -> None:
    """Join options.ray_address, or start a local cluster with CPUs for the most replicas (and their ranks)."""
    if options.ray_address is None:
        # A throwaway local instance: nothing to report anywhere (set the variable to 1 to opt in).
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        init = dict(address="local", num_cpus=max(1, math.ceil(options.most * options.replica_cpus)),
                    include_dashboard=False)
    else:
        init = dict(address=options.ray_address)
    try:
        ray.init(logging_level=ray_level, **init)
    except Exception as e:
        if options.ray_address is None:
            hint = "check that this machine can run Ray (shared memory, free ports)"
        else:  # Ray 2.60 has token authentication on by default, and for an explicit address uses it only if told
            hint = ("check the address; a cluster with token authentication (Ray's default) also needs "
                    "RAY_AUTH_MODE=token and its token (`ray get-auth-token` on the head), which "
                    "--ray-address auto on a machine of the cluster finds by itself")
        where = f"at {options.ray_address}" if options.ray_address else "locally"
        raise RayStartError(f"Ray could not start {where} ({type(e).__name__}: {str(e)[-500:]}); {hint}.") from e
    signal.signal(signal.SIGTERM, _raise_stop)  # ray.init installed its own
    logging.getLogger("ray.serve").setLevel(ray_level)


def _deploy(ray, serve, app_name: str, load: Callable, model: str, config: ServerConfig, options: ReplicaOptions,
            loopback: bool, engine: dict, ray_level: int):
    """Deploy the replicas as the Serve application `app_name`; its handle once they all answer."""
    from ray.serve.config import RequestRouterConfig

    # A local cluster cannot grow: a shortfall would leave the replicas waiting forever.
    if options.ray_address is None and options.num_gpus_per_replica > 0:
        have = ray.cluster_resources().get("GPU", 0)
        if have < options.most * options.replica_gpus:
            gpus = f"--num-gpus-per-replica {options.num_gpus_per_replica:g}"
            if options.tensor_parallel_size > 1:
                gpus += f" x --tensor-parallel-size {options.tensor_parallel_size}"
            raise ReplicaStartError(f"{options.most} replica(s) x {gpus} need more GPUs than this machine has "
                                    f"({have:g}); lower either, or join a cluster (--ray-address).")
    logs = {"log_level": logging.getLevelName(ray_level), "enable_access_log": False}
    serve.start(proxy_location="Disabled", logging_config=logs)  # the HTTP side is the front, here
    if options.autoscaling:
        sizing = {"autoscaling_config": {
            "min_replicas": 1 if options.min_replicas is None else options.min_replicas,
            "max_replicas": options.max_replicas, "initial_replicas": options.replicas,
            # a replica is busy when its batch is full: past that, requests would wait for a new one
            "target_ongoing_requests": engine["max_batch_size"]}}
    else:
        sizing = {"num_replicas": options.replicas}
    deployment = serve.deployment(EngineReplica).options(
        name="engine", **sizing,
        # Each replica admits what one process admits (its own 429 past that, for n > 1); the front
        # queues as many again for a free replica, then answers 429 itself.
        max_ongoing_requests=config.max_concurrent_requests, max_queued_requests=config.max_concurrent_requests,
        # The ranks are this actor's child processes, unknown to Ray: the actor reserves for all of them.
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        request_router_config=RequestRouterConfig(
            request_router_class=MediaAffinityRouter,
            request_router_kwargs={"app": app_name}),
        # a replica that autoscaling stops lets its requests finish, as SIGTERM does
        graceful_shutdown_timeout_s=config.shutdown_timeout_s, graceful_shutdown_wait_loop_s=0.5,
        # a model that does not load will not load on a second try: fail in seconds, not minutes
        max_constructor_retry_count=options.most, logging_config=logs,
        # Ranks can fail while the replica's process lives on: check it often (a cheap attribute read), so
        # a broken replica is replaced in seconds (Serve stops one after 3 failed checks in a row).
        **({"health_check_period_s": _RANK_HEALTH_CHECK_S} if options.tensor_parallel_size > 1 else {}))
    device = "cuda" if options.num_gpus_per_replica > 0 else "cpu"
    try:
        handle = serve.run(deployment.bind(load, config, loopback, engine, device), name=app_name,
                           route_prefix=None, logging_config=logs)
    except RuntimeError as e:
        raise ReplicaStartError(f"the replicas of {model} could not start: {_failure(serve, app_name) or e}") from e
    # The handle builds its router on first use: one call now, so /metrics knows the replicas at once.
    handle.options(method_name="report").remote().result(timeout_s=60)
    return handle


def _failure(serve, app_name: str) -> str:
    """The error a failed replica raised, from Serve's status of the deployment ("" when it has none)."""
    try:
        message = serve.status().applications[app_name].deployments["engine"].message
    except Exception:  # the status is a courtesy: the caller has an error to show anyway
        return ""
    raised = re.findall(r"^(?:\w+\.)*(\w+(?:Error|Exception)): (.+)$", message, re.MULTILINE)
    return f"{raised[-1][0]}: {raised[-1][1]}" if raised else message[-1000:]


def _teardown(ray, serve, app_name: str, started_cluster: bool) -> None:
    """Stop our replicas and leave the cluster; a cluster this process started stops with it (its
    processes, the replicas and Serve's controller included). The front has ended every request by now."""
    if not started_cluster:
        # Deleting waits on Serve's controller, which a broken cluster may never answer: bounded.
        def delete():
            try:
                serve.delete(app_name)
            except Exception as e:
                log.warning("stopping the replicas failed: %s", e)

        worker = threading.Thread(target=delete, name="llavakit-teardown", daemon=True)
        worker.start()
        worker.join(_TEARDOWN_TIMEOUT_S)
    ray.shutdown()
