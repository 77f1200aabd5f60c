#!/usr/bin/env python3
"""python-echo: a plugvisor plugin written against plain grpcio.

It uses no plugvisor code: everything a plugin in any language has to do is
here, in order (docs/PROTOCOL.md is the reference):

1. refuse to run without PLUGVISOR_MAGIC_COOKIE (started by hand, not by the
   supervisor) and without protocol version 1 in PLUGVISOR_PROTOCOL_VERSIONS;
2. listen on unix:$PLUGVISOR_PLUGIN_SOCKET and start serving;
3. only then print the handshake line `plugvisor|1|unix|<path>` to stdout;
4. serve plugvisor.v1.Plugin (and grpc.health.v1.Health) until Shutdown or
   SIGTERM, then drain in-flight calls and exit 0.

Methods: `echo` returns the payload (and the request metadata), `upper`
upper-cases UTF-8 text, `count` returns how many Handle calls this plugin
served before it, as decimal text. That counter is the exported state
(state_version 1), so it survives restarts and upgrades.

Logs are JSON lines on stderr: {"level", "message", "fields", ...}.
"""

import codecs
import itertools
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from concurrent import futures

PLUGIN_NAME = "python-echo"
PLUGIN_VERSION = "0.1.0"
METHODS = ("echo", "upper", "count")

# Handshake constants; they mirror src/handshake.rs (see docs/PROTOCOL.md).
ENV_SOCKET = "PLUGVISOR_PLUGIN_SOCKET"
ENV_NAME = "PLUGVISOR_PLUGIN_NAME"
ENV_INSTANCE_ID = "PLUGVISOR_INSTANCE_ID"
ENV_PROTOCOL_VERSIONS = "PLUGVISOR_PROTOCOL_VERSIONS"
ENV_MAGIC_COOKIE = "PLUGVISOR_MAGIC_COOKIE"
MAGIC_COOKIE_VALUE = "d3c7f1b2-plugvisor-5a9e-4c1d-8f60-plugin-v1"
PROTOCOL_VERSION = 1

# The state format ExportState writes: the Handle count as ASCII decimal.
STATE_VERSION = 1

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Drain budgets for a Shutdown without a deadline (deadline_ms 0) and for a
# SIGTERM that comes first. The supervisor splits timeouts.stop (default 10s)
# into Shutdown's deadline and SIGTERM -> SIGKILL, so SIGTERM gets less.
SHUTDOWN_DRAIN_SECONDS = 5.0
SIGTERM_DRAIN_SECONDS = 2.0

HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.insert(0, os.path.join(HERE, "gen"))

# Imported here but reported only after the cookie check in main(), so that a
# person running the plugin by hand gets the friendly message first.
try:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from plugvisor.v1 import plugin_pb2, plugin_pb2_grpc
except ImportError as _err:  # pragma: no cover - exercised by a broken install
    IMPORT_ERROR = _err
else:
    IMPORT_ERROR = None

log = logging.getLogger(PLUGIN_NAME)


# --------------------------------------------------------------------------
# Logging: one JSON object per line on stderr. The supervisor re-emits each
# line under the plugin's name and keeps "level" and "fields".

_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": _LEVELS.get(record.levelno, "info"),
            "message": record.getMessage(),
            "target": record.name,
        }
        fields = dict(getattr(record, "fields", None) or {})
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        if fields:
            line["fields"] = fields
        # json.dumps escapes newlines, so a record is always exactly one line.
        return json.dumps(line, default=str, ensure_ascii=False)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLinesFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def info(message: str, **fields) -> None:
    log.info(message, extra={"fields": fields})


# --------------------------------------------------------------------------
# The service.


class StopRequest:
    """How the process should stop, requested by Shutdown or by a signal.

    Requests travel through a pipe that the main thread reads. A Python signal
    handler runs on the main thread between two bytecodes, possibly while
    that thread holds a lock (inside Event.wait, a logging handler, ...), so
    the handler must not take any lock: os.write to a pipe is the safe way.

    The first request starts the drain; any later one (say, SIGTERM once the
    Shutdown deadline has passed) cancels whatever is still in flight.
    """

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self.requested = threading.Event()  # set by the main thread; read by HealthCheck
        self.grace = SIGTERM_DRAIN_SECONDS
        self.reason = ""
        self._shutdown_grace = SHUTDOWN_DRAIN_SECONDS

    def from_shutdown_rpc(self, grace: float) -> None:
        self._shutdown_grace = grace
        self._notify(b"S")

    def from_signal(self, signum: int) -> None:
        self._notify(bytes([signum]))

    def _notify(self, code: bytes) -> None:
        try:
            os.write(self._write_fd, code)
        except BlockingIOError:
            pass  # the pipe is full of earlier requests: it is stopping anyway

    def wait_first(self) -> None:
        """Blocks the main thread until the first request, then records it."""
        code = os.read(self._read_fd, 1)
        if code == b"S":
            self.grace, self.reason = self._shutdown_grace, "Shutdown RPC"
        else:
            self.grace, self.reason = SIGTERM_DRAIN_SECONDS, signal.Signals(code[0]).name
        self.requested.set()

    def drained(self) -> None:
        self._notify(b"D")

    def wait_drained(self) -> bool:
        """Blocks until the drain finished (True) or a further stop request
        arrived (False)."""
        return os.read(self._read_fd, 1) == b"D"


class EchoPlugin:
    """plugvisor.v1.Plugin. grpcio looks the methods up by name, so no base
    class is needed (plugin_pb2_grpc.PluginServicer would also do)."""

    def __init__(self, stop: StopRequest) -> None:
        self._stop = stop
        self._lock = threading.Lock()  # guards _count and _config
        self._count = 0  # Handle calls served: the exported state
        self._config: dict = {}

    # -- lifecycle ---------------------------------------------------------

    def Initialize(self, request, context):
        if request.protocol_version not in (0, PROTOCOL_VERSION):
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{PLUGIN_NAME} speaks protocol version {PROTOCOL_VERSION}, "
                f"the supervisor chose {request.protocol_version}",
            )

        config = {}
        if request.config_json:
            try:
                config = json.loads(request.config_json)
            except ValueError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"config_json is not valid JSON: {err}")
            if not isinstance(config, dict):
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"config_json must be a JSON object, got {type(config).__name__}",
                )

        count = 0
        restored = request.HasField("restored_state")
        if restored:
            count = self._restore(request.restored_state, context)

        with self._lock:
            self._config = config
            self._count = count
        info(
            "initialized",
            plugin_name=request.plugin_name,
            instance_id=request.instance_id,
            config=config,
            restored=restored,
            count=count,
        )
        return plugin_pb2.InitializeResponse(
            name=PLUGIN_NAME,
            version=PLUGIN_VERSION,
            methods=list(METHODS),
            stream_methods=list(METHODS),
            state_version=STATE_VERSION,
            protocol_version=PROTOCOL_VERSION,
        )

    @staticmethod
    def _restore(restored, context) -> int:
        """Turns a snapshot back into a count, or fails Initialize with
        FAILED_PRECONDITION so the supervisor reports why."""
        # A plugin whose state format changed would migrate older versions
        # here (`if restored.state_version == 1: ...convert...`). Version 1
        # is the only format python-echo has ever written.
        if restored.state_version != STATE_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"restored state has state_version {restored.state_version}; "
                f"{PLUGIN_NAME} {PLUGIN_VERSION} reads version {STATE_VERSION} only",
            )
        text = restored.state.decode("ascii", errors="replace").strip()
        if text == "":
            return 0
        if not text.isdigit():
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"restored state {restored.state[:32]!r} is not a decimal count",
            )
        return int(text)

    def HealthCheck(self, request, context):
        status = plugin_pb2.HealthCheckResponse
        if self._stop.requested.is_set():
            return status(status=status.NOT_SERVING, message="shutting down")
        return status(status=status.SERVING, message="ok")

    def ExportState(self, request, context):
        with self._lock:
            count = self._count
        return plugin_pb2.ExportStateResponse(state=str(count).encode("ascii"), state_version=STATE_VERSION)

    def Shutdown(self, request, context):
        if request.deadline_ms > 0:
            # Finish a little before the deadline, when SIGTERM would follow.
            deadline = request.deadline_ms / 1000.0
            grace = max(0.0, deadline - min(0.25, deadline / 10))
        else:
            grace = SHUTDOWN_DRAIN_SECONDS  # 0: no deadline given
        info("shutdown requested", deadline_ms=request.deadline_ms, grace_seconds=grace)
        # The main thread stops the server; this reply is an in-flight call
        # that the drain lets finish.
        self._stop.from_shutdown_rpc(grace)
        return plugin_pb2.ShutdownResponse()

    # -- calls ---------------------------------------------------------------

    def Handle(self, request, context):
        method = request.method
        metadata = {}
        if method == "echo":
            payload = request.payload
            metadata = dict(request.metadata)
        elif method == "upper":
            payload = _upper(request.payload, context)
        elif method == "count":
            with self._lock:
                payload = str(self._count).encode("ascii")
        else:
            _unknown_method(method, context)
        with self._lock:
            self._count += 1
        return plugin_pb2.HandleResponse(payload=payload, metadata=metadata, state_changed=True)

    def HandleStream(self, request_iterator, context):
        """Replies chunk by chunk as the request arrives: nothing is buffered
        beyond one chunk (and, for `upper`, an incomplete UTF-8 sequence)."""
        first = next(request_iterator, None)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty stream: the first chunk must name the method")
        method = first.method
        chunks = itertools.chain([first], request_iterator)

        if method == "echo":
            for chunk in chunks:
                if chunk.data:
                    yield plugin_pb2.Chunk(data=chunk.data)
        elif method == "upper":
            decoder = codecs.getincrementaldecoder("utf-8")()
            for chunk in chunks:
                text = _decode(decoder, chunk.data, False, context)
                if text:
                    yield plugin_pb2.Chunk(data=text.upper().encode("utf-8"))
            tail = _decode(decoder, b"", True, context)
            if tail:
                yield plugin_pb2.Chunk(data=tail.upper().encode("utf-8"))
        elif method == "count":
            for _ in chunks:  # the request body is ignored, but read to the end
                pass
            with self._lock:
                count = self._count
            yield plugin_pb2.Chunk(data=str(count).encode("ascii"))
        else:
            _unknown_method(method, context)


def _unknown_method(method: str, context) -> None:
    context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        f"{PLUGIN_NAME} has no method {method!r}; it serves {', '.join(METHODS)}",
    )


def _upper(payload: bytes, context) -> bytes:
    try:
        return payload.decode("utf-8").upper().encode("utf-8")
    except UnicodeDecodeError as err:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"upper needs UTF-8 text: {err}")


def _decode(decoder, data: bytes, final: bool, context) -> str:
    try:
        return decoder.decode(data, final)
    except UnicodeDecodeError as err:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"upper needs UTF-8 text: {err}")


# --------------------------------------------------------------------------
# Process: checks, socket, handshake, signals, drain.


def die(message: str) -> int:
    print(f"{PLUGIN_NAME}: {message}", file=sys.stderr, flush=True)
    return 1


def prepare_socket_path(path: str) -> None:
    """Removes a stale socket left by a previous run; refuses anything else."""
    if not os.path.isabs(path):
        raise ValueError(f"{ENV_SOCKET}={path!r} is not an absolute path")
    if not os.path.isdir(os.path.dirname(path)):
        raise ValueError(f"the directory of {ENV_SOCKET}={path!r} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{path} exists and is not a socket; refusing to remove it")
    os.unlink(path)


def serve(socket_path: str) -> int:
    stop = StopRequest()
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    # Each HandleStream holds a worker thread for its duration.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="rpc"), options=options)
    plugin_pb2_grpc.add_PluginServicer_to_server(EchoPlugin(stop), server)

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", "plugvisor.v1.Plugin"):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    try:
        prepare_socket_path(socket_path)
        server.add_insecure_port(f"unix:{socket_path}")
    except (OSError, ValueError, RuntimeError) as err:
        return die(f"cannot listen on {socket_path}: {err}")

    def on_signal(signum, _frame):
        stop.from_signal(signum)  # no locks, no logging: see StopRequest

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server.start()
    # The socket is listening now; only now may the handshake be printed.
    sys.stdout.write(f"plugvisor|{PROTOCOL_VERSION}|unix|{socket_path}\n")
    sys.stdout.flush()
    info(
        "serving",
        socket=socket_path,
        pid=os.getpid(),
        plugin_name=os.environ.get(ENV_NAME, ""),
        instance_id=os.environ.get(ENV_INSTANCE_ID, ""),
    )

    stop.wait_first()

    info("draining", reason=stop.reason, grace_seconds=stop.grace)
    health_servicer.enter_graceful_shutdown()
    started = time.monotonic()
    done = server.stop(stop.grace)  # stop accepting; cancel what is left after grace
    threading.Thread(target=lambda: (done.wait(), stop.drained()), name="drain-watch", daemon=True).start()
    while not stop.wait_drained():
        info("another stop request: cancelling in-flight calls")
        server.stop(0)

    try:
        prepare_socket_path(socket_path)
    except (OSError, ValueError):
        pass
    info("stopped", drained_seconds=round(time.monotonic() - started, 3))
    return 0


def main() -> int:
    if os.environ.get(ENV_MAGIC_COOKIE) != MAGIC_COOKIE_VALUE:
        return die(
            "This is a plugvisor plugin; it is started by the plugvisor supervisor, not by hand.\n"
            "Put its directory (the one holding plugin.yaml) under the supervisor's plugins_dir,\n"
            "e.g. `plugvisor run --plugins-dir DIR`, then try `plugvisor call python-echo echo --data hi`."
        )
    versions = []
    for part in os.environ.get(ENV_PROTOCOL_VERSIONS, "").split(","):
        part = part.strip()
        if part.isdigit():
            versions.append(int(part))
    if PROTOCOL_VERSION not in versions:
        return die(
            f"this plugin speaks plugvisor protocol version {PROTOCOL_VERSION}, but the supervisor offers "
            f"{ENV_PROTOCOL_VERSIONS}={os.environ.get(ENV_PROTOCOL_VERSIONS, '')!r}; "
            "upgrade the plugin or the supervisor"
        )
    socket_path = os.environ.get(ENV_SOCKET, "")
    if not socket_path:
        return die(f"{ENV_SOCKET} is not set; the supervisor always sets it")
    if IMPORT_ERROR is not None:
        return die(
            f"{sys.executable} cannot import the gRPC runtime or the generated stubs ({IMPORT_ERROR}). "
            f"Run {os.path.normpath(os.path.join(HERE, '..', '..', 'scripts', 'setup-python.sh'))}, "
            "or set PLUGVISOR_PYTHON (in the manifest's env) to a Python with the packages "
            "from requirements.txt."
        )
    setup_logging()
    return serve(socket_path)


if __name__ == "__main__":
    sys.exit(main())
