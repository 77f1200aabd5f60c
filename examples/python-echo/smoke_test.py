#!/usr/bin/env python3
"""End-to-end smoke test for python-echo, without a supervisor.

Starts the plugin through its launcher the way the supervisor does (clean
environment, cwd = this directory, stdin = /dev/null, a 0700 socket
directory), reads the handshake, checks the socket peer is the spawned pid,
then calls every RPC and checks the replies:

    Initialize (fresh, restored, bad restored state), Handle echo/upper/count
    and unknown methods, HandleStream (lock-step multi-chunk echo proving it
    is not buffered, UTF-8 split across chunks, 8 MiB, unknown method),
    HealthCheck, grpc.health.v1, ExportState -> restore in a second instance,
    Shutdown draining an in-flight stream, SIGTERM -> exit 0.

Run it with the venv's Python (scripts/setup-python.sh first):

    .venv/bin/python3 examples/python-echo/smoke_test.py

Exits 0 when everything passed, 1 on the first failure (with the plugin's
stderr).
"""

import json
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.realpath(__file__))
if not os.path.isfile(os.path.join(HERE, "gen", "plugvisor", "v1", "plugin_pb2_grpc.py")):
    subprocess.run([sys.executable, os.path.join(HERE, "gen_stubs.py")], check=True)
sys.path.insert(0, os.path.join(HERE, "gen"))

try:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from plugvisor.v1 import plugin_pb2 as pb
    from plugvisor.v1 import plugin_pb2_grpc
except ImportError as _err:
    sys.exit(f"smoke_test: {sys.executable} cannot import grpc ({_err}); "
             "run scripts/setup-python.sh and use .venv/bin/python3")

LAUNCHER = os.path.join(HERE, "python-echo")
COOKIE = "d3c7f1b2-plugvisor-5a9e-4c1d-8f60-plugin-v1"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 10.0
MIB = 1024 * 1024


class Plugin:
    """One started plugin process, its stderr collected in the background."""

    def __init__(self, workdir: str, name: str, stale_socket=False):
        self.socket_path = os.path.join(workdir, name, "plugin.sock")
        os.makedirs(os.path.dirname(self.socket_path), mode=0o700)
        if stale_socket:
            stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stale.bind(self.socket_path)  # leaves the file behind, nobody listening
            stale.close()
        env = {
            "PATH": CLEAN_PATH,
            "PLUGVISOR_PLUGIN_SOCKET": self.socket_path,
            "PLUGVISOR_PLUGIN_NAME": "python-echo",
            "PLUGVISOR_INSTANCE_ID": f"python-echo-0-{name}",
            "PLUGVISOR_PROTOCOL_VERSIONS": "1",
            "PLUGVISOR_MAGIC_COOKIE": COOKIE,
        }
        if "PYTHON" in os.environ:
            env["PYTHON"] = os.environ["PYTHON"]
        self.proc = subprocess.Popen(
            [LAUNCHER], cwd=HERE, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        self.stderr_lines = []
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        self.channel = None

    def _drain_stderr(self):
        for raw in self.proc.stderr:
            self.stderr_lines.append(raw.decode("utf-8", errors="replace").rstrip("\n"))

    def read_handshake(self) -> str:
        lines = queue.Queue()

        def reader():
            lines.put(self.proc.stdout.readline())

        threading.Thread(target=reader, daemon=True).start()
        try:
            line = lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no handshake within {TIMEOUT}s")
        return line.decode("utf-8").rstrip("\n")

    def connect(self) -> plugin_pb2_grpc.PluginStub:
        options = [
            ("grpc.max_send_message_length", 64 * MIB),
            ("grpc.max_receive_message_length", 64 * MIB),
        ]
        self.channel = grpc.insecure_channel(f"unix:{self.socket_path}", options=options)
        grpc.channel_ready_future(self.channel).result(timeout=TIMEOUT)
        return plugin_pb2_grpc.PluginStub(self.channel)

    def wait(self, timeout=TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._stderr_thread.join(timeout=2)


def peer_pid(path: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _uid, _gid = struct.unpack("3i", creds)
        return pid
    finally:
        s.close()


def expect_status(code, fn, *args, contains=None, **kwargs):
    try:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    except grpc.RpcError as err:
        assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
        if contains is not None:
            assert contains in (err.details() or ""), f"{err.details()!r} does not mention {contains!r}"
        return err
    raise AssertionError(f"expected {code}, call succeeded")


def run_by_hand_checks(workdir: str):
    env = {"PATH": CLEAN_PATH}
    if "PYTHON" in os.environ:
        env["PYTHON"] = os.environ["PYTHON"]
    r = subprocess.run([LAUNCHER], env=env, cwd=workdir, capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 1, f"without the cookie: exit {r.returncode}"
    assert b"This is a plugvisor plugin" in r.stderr, r.stderr
    assert r.stdout == b"", r.stdout

    env.update(PLUGVISOR_MAGIC_COOKIE=COOKIE, PLUGVISOR_PROTOCOL_VERSIONS="2,3",
               PLUGVISOR_PLUGIN_SOCKET=os.path.join(workdir, "nope.sock"))
    r = subprocess.run([LAUNCHER], env=env, cwd=workdir, capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 1, f"without version 1: exit {r.returncode}"
    assert b"protocol version 1" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(workdir, "nope.sock"))
    print("ok   refuses to run by hand / without protocol version 1")


def initialize(stub, restored=None, config=None):
    req = pb.InitializeRequest(
        plugin_name="python-echo", instance_id="python-echo-0-1",
        config_json=json.dumps(config if config is not None else {"greeting": "hi"}),
        protocol_version=1,
    )
    if restored is not None:
        req.restored_state.CopyFrom(restored)
    return stub.Initialize(req, timeout=TIMEOUT)


def test_first_instance(p: Plugin) -> bytes:
    line = p.read_handshake()
    assert line == f"plugvisor|1|unix|{p.socket_path}", f"handshake {line!r}"
    assert peer_pid(p.socket_path) == p.proc.pid, "the listener is not the spawned process (launcher must exec)"
    print("ok   handshake line; SO_PEERCRED pid is the spawned pid")

    stub = p.connect()
    resp = initialize(stub)
    assert resp.name == "python-echo", resp
    assert resp.version, resp
    assert list(resp.methods) == ["echo", "upper", "count"], resp
    assert resp.state_version == 1 and resp.protocol_version == 1, resp
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, initialize, stub, config=[1, 2])
    print("ok   Initialize")

    r = stub.Handle(pb.HandleRequest(method="echo", payload=b"hello", metadata={"k": "v"}), timeout=TIMEOUT)
    assert r.payload == b"hello" and dict(r.metadata) == {"k": "v"} and r.state_changed, r
    r = stub.Handle(pb.HandleRequest(method="upper", payload="héllo".encode()), timeout=TIMEOUT)
    assert r.payload == "HÉLLO".encode(), r
    r = stub.Handle(pb.HandleRequest(method="count"), timeout=TIMEOUT)
    assert r.payload == b"2", r
    big = os.urandom(8 * MIB)  # above gRPC's 4 MiB default
    r = stub.Handle(pb.HandleRequest(method="echo", payload=big), timeout=TIMEOUT)
    assert r.payload == big
    expect_status(grpc.StatusCode.UNIMPLEMENTED, stub.Handle, pb.HandleRequest(method="frobnicate"),
                  timeout=TIMEOUT, contains="frobnicate")
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.Handle, pb.HandleRequest(method="upper", payload=b"\xff"),
                  timeout=TIMEOUT)
    r = stub.Handle(pb.HandleRequest(method="count"), timeout=TIMEOUT)
    assert r.payload == b"4", r  # failed calls are not counted
    print("ok   Handle echo/upper/count, 8 MiB payload, UNIMPLEMENTED, INVALID_ARGUMENT")

    # Lock-step stream: send one chunk, wait for its echo, then the next.
    # This only completes if the plugin replies per chunk, without buffering.
    requests = queue.Queue()

    def request_iter():
        while True:
            item = requests.get()
            if item is None:
                return
            yield item

    replies = stub.HandleStream(request_iter(), timeout=TIMEOUT)
    parts = [b"alpha", b"beta", b"gamma", b"delta"]
    for i, part in enumerate(parts):
        requests.put(pb.Chunk(method="echo", data=part, metadata={"n": "1"}) if i == 0 else pb.Chunk(data=part))
        got = next(replies)
        assert got.data == part, (got.data, part)
    requests.put(None)
    assert list(replies) == []
    print("ok   HandleStream echo replies chunk by chunk")

    # "é" split across two chunks, then upper-cased.
    e = "é".encode()
    chunks = [pb.Chunk(method="upper", data=b"caf" + e[:1]), pb.Chunk(data=e[1:] + b" au lait")]
    out = b"".join(c.data for c in stub.HandleStream(iter(chunks), timeout=TIMEOUT))
    assert out == "CAFÉ AU LAIT".encode(), out

    data = os.urandom(8 * MIB)
    chunks = [pb.Chunk(method="echo", data=data[:MIB])] + [
        pb.Chunk(data=data[i:i + MIB]) for i in range(MIB, len(data), MIB)]
    out = b"".join(c.data for c in stub.HandleStream(iter(chunks), timeout=TIMEOUT))
    assert out == data

    expect_status(grpc.StatusCode.UNIMPLEMENTED, stub.HandleStream,
                  iter([pb.Chunk(method="nope", data=b"x")]), timeout=TIMEOUT, contains="nope")
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.HandleStream, iter([]), timeout=TIMEOUT)
    print("ok   HandleStream UTF-8 across chunks, 8 MiB, UNIMPLEMENTED, empty stream")

    h = stub.HealthCheck(pb.HealthCheckRequest(), timeout=TIMEOUT)
    assert h.status == pb.HealthCheckResponse.SERVING, h
    std = health_pb2_grpc.HealthStub(p.channel)
    for service in ("", "plugvisor.v1.Plugin"):
        s = std.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert s.status == health_pb2.HealthCheckResponse.SERVING, (service, s)
    print("ok   HealthCheck and grpc.health.v1")

    exported = stub.ExportState(pb.ExportStateRequest(), timeout=TIMEOUT)
    assert exported.state == b"5" and exported.state_version == 1, exported
    print("ok   ExportState")
    return exported.state


def test_restored_instance(p: Plugin, state: bytes):
    assert p.read_handshake() == f"plugvisor|1|unix|{p.socket_path}"
    stub = p.connect()
    expect_status(grpc.StatusCode.FAILED_PRECONDITION, initialize, stub,
                  restored=pb.RestoredState(state=state, state_version=2), contains="state_version 2")
    expect_status(grpc.StatusCode.FAILED_PRECONDITION, initialize, stub,
                  restored=pb.RestoredState(state=b"garbage", state_version=1))
    initialize(stub, restored=pb.RestoredState(state=state, state_version=1))
    r = stub.Handle(pb.HandleRequest(method="count"), timeout=TIMEOUT)
    assert r.payload == state, (r.payload, state)
    print("ok   Initialize with restored_state continues the count; bad states are FAILED_PRECONDITION")

    # Shutdown while a stream is in flight: the stream must still complete.
    requests = queue.Queue()

    def request_iter():
        while True:
            item = requests.get()
            if item is None:
                return
            yield item

    replies = stub.HandleStream(request_iter(), timeout=TIMEOUT)
    requests.put(pb.Chunk(method="echo", data=b"before"))
    assert next(replies).data == b"before"
    started = time.monotonic()
    stub.Shutdown(pb.ShutdownRequest(deadline_ms=3000), timeout=TIMEOUT)
    time.sleep(0.3)
    expect_status(grpc.StatusCode.UNAVAILABLE, stub.Handle, pb.HandleRequest(method="echo"), timeout=2)
    requests.put(pb.Chunk(data=b"after"))
    assert next(replies).data == b"after"
    requests.put(None)
    assert list(replies) == []
    code = p.wait()
    assert code == 0, f"exit {code} after Shutdown"
    assert time.monotonic() - started < 3.0, "did not exit within the Shutdown deadline"
    assert not os.path.exists(p.socket_path), "socket file left behind"
    print("ok   Shutdown drains an in-flight stream, refuses new calls, exits 0")


def test_sigterm(p: Plugin):
    stub = p.connect()
    stub.HealthCheck(pb.HealthCheckRequest(), timeout=TIMEOUT)
    p.channel.close()
    p.proc.send_signal(signal.SIGTERM)
    code = p.wait()
    assert code == 0, f"exit {code} after SIGTERM"
    print("ok   SIGTERM exits 0")


def test_sigterm_cuts_a_drain_short(p: Plugin):
    # Shutdown with a long deadline while a stream never ends; the SIGTERM
    # that follows must cancel the stream and let the process exit at once.
    assert p.read_handshake() == f"plugvisor|1|unix|{p.socket_path}"
    stub = p.connect()
    initialize(stub)
    requests = queue.Queue()

    def request_iter():
        while True:
            item = requests.get()
            if item is None:
                return
            yield item

    replies = stub.HandleStream(request_iter(), timeout=30)
    requests.put(pb.Chunk(method="echo", data=b"x"))
    assert next(replies).data == b"x"
    stub.Shutdown(pb.ShutdownRequest(deadline_ms=20000), timeout=TIMEOUT)
    time.sleep(0.2)
    assert p.proc.poll() is None, "exited before the in-flight stream finished"
    started = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    code = p.wait()
    assert code == 0, f"exit {code}"
    assert time.monotonic() - started < 2.0, "SIGTERM did not cut the drain short"
    try:
        list(replies)
        raise AssertionError("the in-flight stream completed instead of being cancelled")
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), err
    requests.put(None)
    print("ok   SIGTERM during a Shutdown drain cancels in-flight calls, exits 0")


def test_sigterm_right_after_handshake(workdir: str, plugins: list):
    # Signals must not deadlock against locks the main thread holds (a signal
    # handler that takes a lock would hang here now and then).
    for i in range(5):
        p = Plugin(workdir, f"early-{i}")
        plugins.append(p)
        p.read_handshake()
        p.proc.send_signal(signal.SIGTERM)
        if i % 2:
            p.proc.send_signal(signal.SIGTERM)  # a second one cancels the drain
        code = p.wait()
        assert code == 0, f"exit {code} after an early SIGTERM"
    print("ok   SIGTERM (once or twice) right after the handshake exits 0")


def main() -> int:
    workdir = tempfile.mkdtemp(prefix="python-echo-smoke-")
    plugins = []
    try:
        run_by_hand_checks(workdir)

        first = Plugin(workdir, "1")
        plugins.append(first)
        state = test_first_instance(first)
        test_sigterm(first)

        # A stale socket file from a "previous run" must not stop the start.
        second = Plugin(workdir, "2", stale_socket=True)
        plugins.append(second)
        test_restored_instance(second, state)
        third = Plugin(workdir, "3")
        plugins.append(third)
        test_sigterm_cuts_a_drain_short(third)
        test_sigterm_right_after_handshake(workdir, plugins)

        for p in plugins:
            for line in p.stderr_lines:
                if line.startswith("{"):
                    record = json.loads(line)
                    assert {"level", "message"} <= record.keys(), record
        print("ok   stderr log lines are JSON")
        print("PASS")
        return 0
    except Exception as err:  # noqa: BLE001 - report any failure, then exit 1
        import traceback

        traceback.print_exc()
        for p in plugins:
            print(f"--- plugin {p.socket_path} stderr ---", file=sys.stderr)
            print("\n".join(p.stderr_lines), file=sys.stderr)
        print(f"FAIL: {err}", file=sys.stderr)
        return 1
    finally:
        for p in plugins:
            p.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
