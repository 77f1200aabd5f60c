#!/usr/bin/env python3
"""python-echo: a plugvisor plugin on the `plugvisor` helper package
(<repo>/python), which does the handshake, the cookie check, signals, the
drain and JSON logs; this file is only the plugin's own behaviour.

Methods: `echo` returns the payload (and the request metadata), `upper`
upper-cases UTF-8 text, `count` returns how many Handle calls this plugin
served before it, as decimal text. That counter is the exported state
(state_version 1), so it survives restarts and upgrades. `echo`, `upper` and
`count` also stream, replying chunk by chunk.
"""

import codecs
import sys
import threading

try:
    import grpc
    import plugvisor
except ImportError as err:
    sys.exit(f"python-echo: {sys.executable} cannot import {err.name}; run scripts/setup-python.sh "
             "(or pip install <repo>/python into this interpreter)")

INVALID = grpc.StatusCode.INVALID_ARGUMENT


class Echo(plugvisor.Plugin):
    name = "python-echo"
    version = "0.1.0"
    methods = ["echo", "upper", "count"]
    stream_methods = ["echo", "upper", "count"]
    state_version = 1

    def __init__(self):
        self.lock = threading.Lock()
        self.count = 0

    def initialize(self, config, restored, restored_version):
        if restored is None:
            return
        if restored_version != 1:
            raise plugvisor.Error(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"restored state has state_version {restored_version}; "
                                  f"{self.name} {self.version} reads version 1 only")
        text = restored.decode("ascii", errors="replace").strip()
        if text and not text.isdigit():
            raise plugvisor.Error(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"restored state {restored[:32]!r} is not a decimal count")
        self.count = int(text or 0)

    def handle(self, call):
        metadata = {}
        if call.method == "echo":
            payload, metadata = call.payload, call.metadata
        elif call.method == "upper":
            payload = upper(call.payload)
        else:  # count
            with self.lock:
                payload = str(self.count).encode()
        with self.lock:  # failed calls are not counted
            self.count += 1
        return plugvisor.Reply(payload, metadata, state_changed=True)

    def handle_stream(self, call, chunks):
        if call.method == "echo":
            yield call.payload
            yield from chunks
        elif call.method == "upper":
            # A UTF-8 sequence may be split across chunks.
            decoder = codecs.getincrementaldecoder("utf-8")()
            for data in _chain(call.payload, chunks):
                yield decode(decoder, data, False).upper().encode()
            yield decode(decoder, b"", True).upper().encode()
        else:  # count: the body is read to the end, then ignored
            for _ in chunks:
                pass
            with self.lock:
                yield str(self.count).encode()

    def export_state(self):
        with self.lock:
            return str(self.count).encode()


def _chain(first, rest):
    yield first
    yield from rest


def upper(payload):
    try:
        return payload.decode("utf-8").upper().encode("utf-8")
    except UnicodeDecodeError as err:
        raise plugvisor.Error(INVALID, f"upper needs UTF-8 text: {err}") from None


def decode(decoder, data, final):
    try:
        return decoder.decode(data, final)
    except UnicodeDecodeError as err:
        raise plugvisor.Error(INVALID, f"upper needs UTF-8 text: {err}") from None


if __name__ == "__main__":
    plugvisor.serve(Echo())
