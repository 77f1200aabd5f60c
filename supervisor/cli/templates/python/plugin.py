"""{{name}}: a plugvisor plugin, written with the plugvisor helper package.

Methods (Handle):
- ``echo``: returns the payload unchanged;
- ``config``: returns the configuration Initialize delivered, as JSON
  (``plugvisor conformance`` uses it to check that config arrives).

``echo`` also streams (HandleStream), chunk by chunk as they arrive.

The plugin keeps no state. To keep some across restarts and upgrades, set
``state_version``, return bytes from ``export_state`` and read ``restored``
in ``initialize`` (see examples/python-echo in the plugvisor repository).
"""

import json
import threading

import grpc

import plugvisor


class {{type}}(plugvisor.Plugin):
    name = "{{name}}"
    version = "0.1.0"
    methods = ["echo", "config"]
    stream_methods = ["echo"]

    def __init__(self):
        # Handlers run on a thread pool: shared state goes behind a lock.
        self._lock = threading.Lock()
        self._config = {}

    def initialize(self, config, restored, restored_version):
        # Refuse config the plugin cannot use: a plugin that fails Initialize
        # is never ready, and the operator sees why.
        if not isinstance(config, dict):
            raise plugvisor.Error(grpc.StatusCode.INVALID_ARGUMENT, "config must be an object")
        with self._lock:
            self._config = config

    def handle(self, call):
        if call.method == "config":
            with self._lock:
                return json.dumps(self._config)
        return call.payload  # "echo": the helper answers unknown methods itself

    def handle_stream(self, call, chunks):
        yield call.payload  # the first chunk's data
        yield from chunks  # the rest, as they arrive


if __name__ == "__main__":
    plugvisor.serve({{type}}())
