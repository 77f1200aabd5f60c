"""The plugvisor.v1 protocol messages and service, compiled from the bundled
plugin.proto (a copy of <repo>/proto/plugvisor/v1/plugin.proto) when first
imported, with grpcio-tools: no generated code to keep in step."""

import grpc

plugin_pb2, plugin_pb2_grpc = grpc.protos_and_services("plugvisor/v1/plugin.proto")

__all__ = ["plugin_pb2", "plugin_pb2_grpc"]
