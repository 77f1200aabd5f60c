"""Write plugvisor plugins in Python.

Subclass :class:`Plugin`, list your methods, implement :meth:`Plugin.handle`
(and :meth:`Plugin.handle_stream` to stream), and call :func:`serve`::

    import plugvisor

    class Echo(plugvisor.Plugin):
        methods = ["echo"]

        def handle(self, call):
            return call.payload

    plugvisor.serve(Echo())

:func:`serve` does what docs/PROTOCOL.md asks of every plugin: it refuses to
run without the magic cookie (message on stderr, exit 1), chooses the
protocol version, removes a stale socket, listens on the assigned socket,
prints the handshake only once serving, serves ``plugvisor.v1.Plugin`` and
``grpc.health.v1.Health``, logs JSON lines to stderr, and drains on
``Shutdown`` (within its deadline) or ``SIGTERM`` (a second signal cancels
what is left), then exits 0.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, NoReturn

import grpc

__all__ = [
    "Call",
    "Error",
    "Plugin",
    "Reply",
    "log",
    "serve",
]

MAGIC_COOKIE = "d3c7f1b2-plugvisor-5a9e-4c1d-8f60-plugin-v1"
PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# A SIGTERM that comes first gets this long to drain: the supervisor sends
# SIGKILL after the second half of timeouts.stop (5s by default).
SIGTERM_DRAIN_SECONDS = 4.0
# Shutdown(deadline_ms=0) means "no deadline given".
DEFAULT_DRAIN_SECONDS = 5.0


class Error(Exception):
    """Raise from a handler to answer with this gRPC status; it reaches the
    caller unchanged. ``Error(grpc.StatusCode.INVALID_ARGUMENT, "why")``."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Call:
    """One ``Handle`` call (or the head of a ``HandleStream`` call)."""

    method: str
    payload: bytes
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Reply:
    """A reply with more than a payload: metadata, and whether the call
    changed the exportable state (so the supervisor can snapshot it)."""

    payload: bytes = b""
    metadata: Mapping[str, str] = field(default_factory=dict)
    state_changed: bool = False


class Plugin:
    """Override what you need; the defaults suit a stateless plugin.

    Handlers run on a thread pool (``serve(max_workers=...)``): keep shared
    state behind a lock.
    """

    #: Reported in Initialize; empty means the name the supervisor gave.
    name: str = ""
    version: str = "0.0.0"
    #: What ``handle`` accepts; anything else answers UNIMPLEMENTED.
    methods: Iterable[str] = ()
    #: What ``handle_stream`` accepts; empty: the plugin does not stream.
    stream_methods: Iterable[str] = ()
    #: The format of ``export_state``; 0: no state.
    state_version: int = 0

    def initialize(self, config: dict, restored: bytes | None, restored_version: int) -> None:
        """Called once, first. ``restored`` is the last exported state, or
        None. Raise :class:`Error` (INVALID_ARGUMENT for bad config,
        FAILED_PRECONDITION for unreadable state) to refuse."""

    def handle(self, call: Call) -> bytes | str | Reply:
        raise Error(grpc.StatusCode.UNIMPLEMENTED, f"no method {call.method!r}")

    def handle_stream(self, call: Call, chunks: Iterator[bytes]) -> Iterable[bytes]:
        """``call.payload`` is the first chunk; ``chunks`` yields the rest as
        they arrive. Yield the reply as it is produced."""
        raise Error(grpc.StatusCode.UNIMPLEMENTED, f"method {call.method!r} does not stream")

    def health(self) -> tuple[str, str]:
        """("SERVING" | "NOT_SERVING" | "DEGRADED", message)."""
        return ("SERVING", "")

    def export_state(self) -> bytes:
        return b""

    def validate_config(self, config: dict) -> str | None:
        """Asked before `plugvisor config` rolls out a new config (the complete
        merged one): return a reason to refuse it, or None to accept."""
        return None

    def shutdown(self) -> None:
        """Called after the drain, just before exit: flush and close."""


def log(level: str, message: str, **fields: Any) -> None:
    """One JSON log record on stderr, the shape the supervisor keeps."""
    record = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "level": level,
        "message": message,
    }
    if fields:
        record["fields"] = fields
    try:
        line = json.dumps(record, default=str)
    except (TypeError, ValueError) as err:
        line = json.dumps({"level": "error", "message": f"cannot log {message!r}: {err}"})
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _fail(message: str) -> NoReturn:
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
    sys.exit(1)


def _choose_version(offered: str) -> int | None:
    versions = set()
    for part in offered.split(","):
        try:
            versions.add(int(part.strip()))
        except ValueError:
            continue
    return PROTOCOL_VERSION if PROTOCOL_VERSION in versions else None


def _abort(context: grpc.ServicerContext, err: Error) -> NoReturn:
    context.abort(err.code, err.message)
    raise AssertionError("context.abort returns only by raising")


class _Servicer:
    """Adapts a :class:`Plugin` to the generated servicer."""

    def __init__(self, plugin: Plugin, pb, stop) -> None:
        self.plugin = plugin
        self.pb = pb
        self.stop = stop
        self.methods = frozenset(plugin.methods)
        self.stream_methods = frozenset(plugin.stream_methods)
        self.initialized = threading.Event()
        self.draining = threading.Event()

    def _ready(self, context) -> None:
        if not self.initialized.is_set():
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not initialized: Initialize comes first")

    def Initialize(self, request, context):
        if request.protocol_version not in (0, PROTOCOL_VERSION):
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Initialize asked for protocol version {request.protocol_version}; this plugin speaks {PROTOCOL_VERSION}",
            )
        try:
            config = json.loads(request.config_json) if request.config_json.strip() else {}
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"config_json is not valid JSON: {err}")
        if not isinstance(config, dict):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "config_json must be a JSON object")
        restored = request.restored_state if request.HasField("restored_state") else None
        try:
            self.plugin.initialize(
                config,
                bytes(restored.state) if restored is not None else None,
                restored.state_version if restored is not None else 0,
            )
        except Error as err:
            _abort(context, err)
        self.initialized.set()
        log("info", "initialized", instance_id=request.instance_id, restored=restored is not None)
        return self.pb.InitializeResponse(
            name=self.plugin.name or request.plugin_name,
            version=self.plugin.version,
            methods=list(self.plugin.methods),
            stream_methods=list(self.plugin.stream_methods),
            state_version=self.plugin.state_version,
            protocol_version=PROTOCOL_VERSION,
        )

    def Handle(self, request, context):
        self._ready(context)
        if request.method not in self.methods:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"no method {request.method!r} (methods: {', '.join(sorted(self.methods))})",
            )
        try:
            reply = self.plugin.handle(Call(request.method, bytes(request.payload), dict(request.metadata)))
        except Error as err:
            _abort(context, err)
        if isinstance(reply, str):
            reply = reply.encode()
        if isinstance(reply, (bytes, bytearray, memoryview)):
            reply = Reply(bytes(reply))
        return self.pb.HandleResponse(
            payload=reply.payload, metadata=dict(reply.metadata), state_changed=reply.state_changed
        )

    def HandleStream(self, request_iterator, context):
        self._ready(context)
        first = next(request_iterator, None)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty stream: the first chunk names the method")
        if first.method not in self.stream_methods:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"method {first.method!r} does not stream (stream methods: {', '.join(sorted(self.stream_methods)) or 'none'})",
            )
        rest = (bytes(chunk.data) for chunk in request_iterator)
        try:
            for data in self.plugin.handle_stream(Call(first.method, bytes(first.data), dict(first.metadata)), rest):
                if data:
                    yield self.pb.Chunk(data=bytes(data))
        except Error as err:
            _abort(context, err)

    def HealthCheck(self, request, context):
        if self.draining.is_set():
            return self.pb.HealthCheckResponse(status=self.pb.HealthCheckResponse.NOT_SERVING, message="shutting down")
        status, message = self.plugin.health()
        enum = self.pb.HealthCheckResponse.Status
        return self.pb.HealthCheckResponse(status=enum.Value(status), message=message)

    def ExportState(self, request, context):
        try:
            state = self.plugin.export_state()
        except Error as err:
            _abort(context, err)
        return self.pb.ExportStateResponse(state=state, state_version=self.plugin.state_version)

    def ValidateConfig(self, request, context):
        try:
            config = json.loads(request.config_json) if request.config_json.strip() else {}
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"config_json is not valid JSON: {err}")
        if not isinstance(config, dict):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "config_json must be a JSON object")
        try:
            reason = self.plugin.validate_config(config)
        except Error as err:
            _abort(context, err)
        return self.pb.ValidateConfigResponse(accepted=reason is None, reason=reason or "")

    def Session(self, request_iterator, context):
        # Optional in the protocol: Initialize does not offer sessions, so
        # the supervisor sends unary Handle calls; answer the RPC the way a
        # generated servicer answers one it does not implement.
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "sessions are not offered; use Handle")

    def __getattr__(self, name):
        # RPCs added to the protocol after this helper was written answer
        # UNIMPLEMENTED, as a generated servicer's would, instead of
        # breaking the plugin's start.
        if name[:1].isupper():
            def unimplemented(request, context):
                context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented")
            return unimplemented
        raise AttributeError(name)

    def Shutdown(self, request, context):
        grace = request.deadline_ms / 1000 * 0.95 if request.deadline_ms else DEFAULT_DRAIN_SECONDS
        log("info", "shutdown requested", deadline_ms=request.deadline_ms)
        self.stop("Shutdown RPC", grace)
        return self.pb.ShutdownResponse()


def serve(plugin: Plugin, *, max_workers: int = 8) -> NoReturn:
    """Serves ``plugin`` as the supervisor expects, then exits the process.

    ``max_workers`` bounds concurrent calls; each is a thread, and a
    manifest's ``limits.pids`` counts threads (grpcio adds a few of its own).
    """
    if os.environ.get("PLUGVISOR_MAGIC_COOKIE") != MAGIC_COOKIE:
        _fail("This is a plugvisor plugin; it is started by the plugvisor supervisor, not by hand.")
    offered = os.environ.get("PLUGVISOR_PROTOCOL_VERSIONS", "")
    version = _choose_version(offered)
    if version is None:
        _fail(f"this plugin speaks plugvisor protocol version {PROTOCOL_VERSION}; the supervisor offered {offered!r}")
    path = os.environ.get("PLUGVISOR_PLUGIN_SOCKET", "")
    if not path:
        _fail("PLUGVISOR_PLUGIN_SOCKET is not set")

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from plugvisor.v1 import plugin_pb2, plugin_pb2_grpc

    # Shutdown and signals wake the main thread through a pipe: a signal
    # handler must not take locks, and os.write is async-signal-safe.
    wake_r, wake_w = os.pipe()
    reasons: list[tuple[str, float]] = []
    reasons_lock = threading.Lock()

    def stop(reason: str, grace: float) -> None:
        with reasons_lock:
            reasons.append((reason, grace))
            first = len(reasons) == 1
        if first:  # a repeated Shutdown changes nothing
            os.write(wake_w, b"x")

    def on_signal(signum, _frame):
        os.write(wake_w, bytes([signum]))

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    servicer = _Servicer(plugin, plugin_pb2, stop)
    plugin_pb2_grpc.add_PluginServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    for service in ("", "plugvisor.v1.Plugin"):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    try:
        os.unlink(path)  # a stale socket from a previous child
    except FileNotFoundError:
        pass
    except OSError as err:
        _fail(f"cannot remove the stale socket {path}: {err.strerror}")
    try:
        server.add_insecure_port(f"unix:{path}")
    except RuntimeError as err:
        _fail(f"cannot listen on {path}: {err}")
    server.start()
    # Listening: now, and only now, the handshake.
    sys.stdout.write(f"plugvisor|{version}|unix|{path}\n")
    sys.stdout.flush()
    log("info", "serving", socket=path, pid=os.getpid(), instance_id=os.environ.get("PLUGVISOR_INSTANCE_ID", ""))

    woke = os.read(wake_r, 1)
    if woke == b"x":
        with reasons_lock:
            reason, grace = reasons[0]
    else:
        reason, grace = signal.Signals(woke[0]).name, SIGTERM_DRAIN_SECONDS
    log("info", "draining", reason=reason, grace_seconds=round(grace, 3))
    servicer.draining.set()
    health_servicer.enter_graceful_shutdown()
    started = time.monotonic()
    drained = server.stop(grace)
    # A second signal while draining: the deadline has passed, cancel the rest.
    waiter = threading.Thread(target=lambda: (os.read(wake_r, 1), server.stop(0)), daemon=True)
    waiter.start()
    drained.wait()
    plugin.shutdown()
    try:
        os.unlink(path)
    except OSError:
        pass
    log("info", "stopped", drained_seconds=round(time.monotonic() - started, 3))
    sys.stdout.flush()
    os._exit(0)
