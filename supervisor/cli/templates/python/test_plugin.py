"""Tests for the {{name}} plugin, without a supervisor.

Starts the plugin through its launcher the way the supervisor does (a clean
environment, the handshake variables, a private socket directory), reads the
handshake line, and calls it over gRPC. Run it with the Python that has the
plugvisor helper package:

    python3 test_plugin.py      # or: pytest test_plugin.py

Exits 0 when every test passed, 1 otherwise.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import grpc

from plugvisor.v1 import plugin_pb2 as pb
from plugvisor.v1 import plugin_pb2_grpc

HERE = os.path.dirname(os.path.abspath(__file__))
COOKIE = "d3c7f1b2-plugvisor-5a9e-4c1d-8f60-plugin-v1"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 20.0  # seconds for the start; each call gets 10


class Started:
    """The plugin, started as the supervisor starts it; always stopped."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="{{name}}-test-")
        os.chmod(self.dir, 0o700)
        self.socket = os.path.join(self.dir, "plugin.sock")
        env = {
            "PATH": CLEAN_PATH,
            "PLUGVISOR_PLUGIN_SOCKET": self.socket,
            "PLUGVISOR_PLUGIN_NAME": "{{name}}",
            "PLUGVISOR_INSTANCE_ID": "{{name}}-0-1",
            "PLUGVISOR_PROTOCOL_VERSIONS": "1",
            "PLUGVISOR_MAGIC_COOKIE": COOKIE,
            # This interpreter, which has the helper package.
            "PYTHON": sys.executable,
        }
        self.proc = subprocess.Popen(
            [os.path.join(HERE, "run")], cwd=HERE, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, start_new_session=True,
        )
        try:
            line = self._handshake()
            assert line == f"plugvisor|1|unix|{self.socket}", f"handshake line {line!r}"
            self.channel = grpc.insecure_channel(f"unix:{self.socket}")
            self.stub = plugin_pb2_grpc.PluginStub(self.channel)
        except BaseException:
            self.stop()
            raise

    def _handshake(self):
        """The first line starting with `plugvisor|`, within TIMEOUT."""
        deadline = time.monotonic() + TIMEOUT
        buffered = b""
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                if line.startswith(b"plugvisor|"):
                    return line.decode()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no handshake within {TIMEOUT}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 4096)
                if not data:
                    raise AssertionError(f"the plugin exited before its handshake ({self.proc.wait()})")
                buffered += data

    def stop(self):
        """Shutdown RPC if connected, then the exit status (SIGKILL after 10s)."""
        try:
            if hasattr(self, "stub"):
                self.stub.Shutdown(pb.ShutdownRequest(deadline_ms=2000), timeout=10)
                self.channel.close()
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc.stdout.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def initialize(stub, config):
    return stub.Initialize(
        pb.InitializeRequest(plugin_name="{{name}}", instance_id="{{name}}-0-1",
                             config_json=json.dumps(config), protocol_version=1),
        timeout=10,
    )


def test_echoes_and_returns_its_config():
    plugin = Started()
    try:
        init = initialize(plugin.stub, {"greeting": "hi"})
        assert list(init.methods) == ["echo", "config"], init
        assert list(init.stream_methods) == ["echo"], init
        echo = plugin.stub.Handle(pb.HandleRequest(method="echo", payload=b"hello"), timeout=10)
        assert echo.payload == b"hello", echo
        config = plugin.stub.Handle(pb.HandleRequest(method="config"), timeout=10)
        assert json.loads(config.payload) == {"greeting": "hi"}, config
    finally:
        assert plugin.stop() == 0, "the plugin did not exit 0 after Shutdown"


def test_streams_chunks_back():
    plugin = Started()
    try:
        initialize(plugin.stub, {})
        chunks = [pb.Chunk(method="echo", data=b"ab"), pb.Chunk(data=b"cd"), pb.Chunk(data=b"ef")]
        out = [c.data for c in plugin.stub.HandleStream(iter(chunks), timeout=10)]
        assert b"".join(out) == b"abcdef", out
    finally:
        assert plugin.stop() == 0, "the plugin did not exit 0 after Shutdown"


def test_unknown_methods_are_unimplemented():
    plugin = Started()
    try:
        initialize(plugin.stub, {})
        try:
            plugin.stub.Handle(pb.HandleRequest(method="no-such-method"), timeout=10)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED, err
        else:
            raise AssertionError("an unknown method was answered")
    finally:
        assert plugin.stop() == 0, "the plugin did not exit 0 after Shutdown"


if __name__ == "__main__":
    tests = [(name, fn) for name, fn in sorted(globals().items()) if name.startswith("test_")]
    failed = 0
    for name, fn in tests:
        try:
            fn()
            print(f"ok      {name}")
        except Exception as err:  # report every test, then fail
            failed += 1
            print(f"FAILED  {name}: {type(err).__name__}: {err}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
