package main

// Tests for the plugin, without a supervisor: it is served on a real Unix
// socket in a temporary directory and called through a real gRPC client.
// Run them with `./build.sh test`.

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	pb "github.com/plugvisor/plugvisor/gen/go/plugvisor/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// start serves a new plugin and returns a client; both stop when the test ends.
func start(t *testing.T) (pb.PluginClient, context.Context) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "plugin.sock")
	listener, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("listen on %s: %v", path, err)
	}
	server, _ := newServer(newPlugin())
	go server.Serve(listener)
	t.Cleanup(server.Stop)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	dial := func(ctx context.Context, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", path)
	}
	conn, err := grpc.DialContext(ctx, path, grpc.WithInsecure(), grpc.WithContextDialer(dial), grpc.WithBlock())
	if err != nil {
		t.Fatalf("connect to %s: %v", path, err)
	}
	t.Cleanup(func() { conn.Close() })
	return pb.NewPluginClient(conn), ctx
}

func initialize(t *testing.T, ctx context.Context, client pb.PluginClient, config string) *pb.InitializeResponse {
	t.Helper()
	init, err := client.Initialize(ctx, &pb.InitializeRequest{PluginName: name, InstanceId: name + "-0-1", ConfigJson: config, ProtocolVersion: protocol})
	if err != nil {
		t.Fatalf("Initialize: %v", err)
	}
	return init
}

func TestEchoesAndReturnsItsConfig(t *testing.T) {
	client, ctx := start(t)
	init := initialize(t, ctx, client, `{"greeting":"hi"}`)
	if !reflect.DeepEqual(init.Methods, methods) || !reflect.DeepEqual(init.StreamMethods, streamMethods) {
		t.Fatalf("Initialize answered methods %v, stream methods %v", init.Methods, init.StreamMethods)
	}
	echo, err := client.Handle(ctx, &pb.HandleRequest{Method: "echo", Payload: []byte("hello")})
	if err != nil || string(echo.Payload) != "hello" {
		t.Fatalf("echo: %v, %v", echo, err)
	}
	reply, err := client.Handle(ctx, &pb.HandleRequest{Method: "config"})
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	var config map[string]interface{}
	if err := json.Unmarshal(reply.Payload, &config); err != nil || config["greeting"] != "hi" {
		t.Fatalf("config returned %q (%v)", reply.Payload, err)
	}
}

func TestStreamsChunksBack(t *testing.T) {
	client, ctx := start(t)
	initialize(t, ctx, client, "{}")
	stream, err := client.HandleStream(ctx)
	if err != nil {
		t.Fatalf("HandleStream: %v", err)
	}
	for i, data := range []string{"ab", "cd", "ef"} {
		chunk := &pb.Chunk{Data: []byte(data)}
		if i == 0 {
			chunk.Method = "echo"
		}
		if err := stream.Send(chunk); err != nil {
			t.Fatalf("send: %v", err)
		}
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatalf("close: %v", err)
	}
	var out []byte
	for {
		chunk, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("receive: %v", err)
		}
		out = append(out, chunk.Data...)
	}
	if string(out) != "abcdef" {
		t.Fatalf("streamed back %q", out)
	}
}

func TestUnknownMethodsAreUnimplemented(t *testing.T) {
	client, ctx := start(t)
	initialize(t, ctx, client, "")
	_, err := client.Handle(ctx, &pb.HandleRequest{Method: "no-such-method"})
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("an unknown method answered %v", err)
	}
}

func TestCallsBeforeInitializeAreRefused(t *testing.T) {
	client, ctx := start(t)
	_, err := client.Handle(ctx, &pb.HandleRequest{Method: "echo"})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("a call before Initialize answered %v", err)
	}
}
