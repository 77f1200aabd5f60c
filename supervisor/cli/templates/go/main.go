// Command {{name}} is a plugvisor plugin in Go, on grpc-go: the handshake,
// the cookie check, every RPC of plugvisor.v1.Plugin, grpc.health.v1, JSON
// logs, and a drain on Shutdown or SIGTERM.
//
// Methods (Handle): "echo" returns the payload unchanged; "config" returns
// the configuration Initialize delivered, as JSON (plugvisor conformance
// uses it to check that config arrives). "echo" also streams (HandleStream),
// chunk by chunk as they arrive.
//
// The plugin keeps no state. To keep some across restarts and upgrades,
// return it from ExportState and read InitializeRequest.RestoredState (see
// examples/go-echo in the plugvisor repository).
//
// Build and test it with ./build.sh (GOPATH mode; see README.md).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	pb "github.com/plugvisor/plugvisor/gen/go/plugvisor/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

const (
	name       = "{{name}}"
	cookie     = "d3c7f1b2-plugvisor-5a9e-4c1d-8f60-plugin-v1"
	protocol   = 1
	maxMessage = 64 << 20
	// Grace when SIGTERM arrives first: the supervisor sends SIGKILL after
	// the other half of timeouts.stop (5s by default).
	sigtermGrace = 4 * time.Second
)

var methods = []string{"echo", "config"}

// streamMethods are the methods HandleStream accepts.
var streamMethods = []string{"echo"}

// logf writes one JSON log record to stderr, the shape the supervisor keeps.
func logf(level, message string, fields map[string]interface{}) {
	record := map[string]interface{}{
		"timestamp": time.Now().UTC().Format("2006-01-02T15:04:05.000Z"),
		"level":     level,
		"message":   message,
		"target":    name,
	}
	if len(fields) > 0 {
		record["fields"] = fields
	}
	line, err := json.Marshal(record)
	if err != nil {
		line = []byte(fmt.Sprintf(`{"level":"error","message":"cannot log %q: %v"}`, message, err))
	}
	os.Stderr.Write(append(line, '\n'))
}

type plugin struct {
	pb.UnimplementedPluginServer

	initialized atomic.Bool

	mu     sync.Mutex
	config map[string]interface{}

	// stop asks main to drain within the given grace; buffered so Shutdown
	// never blocks on it.
	stop chan time.Duration
}

func newPlugin() *plugin {
	return &plugin{config: map[string]interface{}{}, stop: make(chan time.Duration, 1)}
}

// newServer serves p and grpc.health.v1 with the message limits the
// protocol asks for.
func newServer(p *plugin) (*grpc.Server, *health.Server) {
	server := grpc.NewServer(grpc.MaxRecvMsgSize(maxMessage), grpc.MaxSendMsgSize(maxMessage))
	pb.RegisterPluginServer(server, p)
	healthServer := health.NewServer()
	healthpb.RegisterHealthServer(server, healthServer)
	return server, healthServer
}

func (p *plugin) ready() error {
	if !p.initialized.Load() {
		return status.Error(codes.FailedPrecondition, "not initialized: Initialize comes first")
	}
	return nil
}

func (p *plugin) Initialize(ctx context.Context, req *pb.InitializeRequest) (*pb.InitializeResponse, error) {
	if req.ProtocolVersion != 0 && req.ProtocolVersion != protocol {
		return nil, status.Errorf(codes.FailedPrecondition, "Initialize asked for protocol version %d; %s speaks %d", req.ProtocolVersion, name, protocol)
	}
	// Refuse config the plugin cannot use: a plugin that fails Initialize
	// is never ready, and the operator sees why.
	config := map[string]interface{}{}
	if strings.TrimSpace(req.ConfigJson) != "" {
		if err := json.Unmarshal([]byte(req.ConfigJson), &config); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "config_json is not a JSON object: %v", err)
		}
	}
	p.mu.Lock()
	p.config = config
	p.mu.Unlock()
	p.initialized.Store(true)
	logf("info", "initialized", map[string]interface{}{"instance_id": req.InstanceId})
	return &pb.InitializeResponse{
		Name:            name,
		Version:         "0.1.0",
		Methods:         methods,
		StreamMethods:   streamMethods,
		ProtocolVersion: protocol,
	}, nil
}

func (p *plugin) Handle(ctx context.Context, req *pb.HandleRequest) (*pb.HandleResponse, error) {
	if err := p.ready(); err != nil {
		return nil, err
	}
	switch req.Method {
	case "echo":
		return &pb.HandleResponse{Payload: req.Payload}, nil
	case "config":
		p.mu.Lock()
		encoded, err := json.Marshal(p.config)
		p.mu.Unlock()
		if err != nil {
			return nil, status.Errorf(codes.Internal, "cannot encode the config: %v", err)
		}
		return &pb.HandleResponse{Payload: encoded}, nil
	default:
		return nil, status.Errorf(codes.Unimplemented, "%s has no method %q (it has %s)", name, req.Method, strings.Join(methods, ", "))
	}
}

func (p *plugin) HandleStream(stream pb.Plugin_HandleStreamServer) error {
	if err := p.ready(); err != nil {
		return err
	}
	first, err := stream.Recv()
	if err == io.EOF {
		return status.Error(codes.InvalidArgument, "empty stream: the first chunk names the method")
	}
	if err != nil {
		return err
	}
	if first.Method != "echo" {
		return status.Errorf(codes.Unimplemented, "%s cannot stream method %q (it streams %s)", name, first.Method, strings.Join(streamMethods, ", "))
	}
	// Reply as the input arrives: nothing is held beyond one chunk.
	for chunk := first; ; {
		if len(chunk.Data) > 0 {
			if err := stream.Send(&pb.Chunk{Data: chunk.Data}); err != nil {
				return err
			}
		}
		chunk, err = stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func (p *plugin) HealthCheck(ctx context.Context, req *pb.HealthCheckRequest) (*pb.HealthCheckResponse, error) {
	return &pb.HealthCheckResponse{Status: pb.HealthCheckResponse_SERVING}, nil
}

func (p *plugin) ExportState(ctx context.Context, req *pb.ExportStateRequest) (*pb.ExportStateResponse, error) {
	return &pb.ExportStateResponse{}, nil // stateless
}

func (p *plugin) Shutdown(ctx context.Context, req *pb.ShutdownRequest) (*pb.ShutdownResponse, error) {
	// Finish a little before the deadline, when SIGTERM would follow; 0
	// means no deadline was given.
	grace := time.Duration(req.DeadlineMs) * time.Millisecond * 95 / 100
	if req.DeadlineMs == 0 {
		grace = sigtermGrace
	}
	logf("info", "shutdown requested", map[string]interface{}{"deadline_ms": req.DeadlineMs})
	select {
	case p.stop <- grace:
	default: // already draining
	}
	return &pb.ShutdownResponse{}, nil
}

// chooseVersion picks the highest offered version this plugin speaks.
func chooseVersion(offered string) (int, bool) {
	for _, field := range strings.Split(offered, ",") {
		if v, err := strconv.Atoi(strings.TrimSpace(field)); err == nil && v == protocol {
			return v, true
		}
	}
	return 0, false
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func main() {
	if os.Getenv("PLUGVISOR_MAGIC_COOKIE") != cookie {
		fail("This is a plugvisor plugin; it is started by the plugvisor supervisor, not by hand.")
	}
	version, ok := chooseVersion(os.Getenv("PLUGVISOR_PROTOCOL_VERSIONS"))
	if !ok {
		fail("%s speaks plugvisor protocol version %d; the supervisor offered %q", name, protocol, os.Getenv("PLUGVISOR_PROTOCOL_VERSIONS"))
	}
	path := os.Getenv("PLUGVISOR_PLUGIN_SOCKET")
	if path == "" {
		fail("PLUGVISOR_PLUGIN_SOCKET is not set")
	}

	// SIGTERM is caught before listening, so an early one is not fatal.
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)

	// A previous child may have left its socket file behind.
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		fail("cannot remove the stale socket %s: %v", path, err)
	}
	listener, err := net.Listen("unix", path)
	if err != nil {
		fail("cannot listen on %s: %v", path, err)
	}

	p := newPlugin()
	server, healthServer := newServer(p)
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()

	// Listening: now, and only now, the handshake. os.Stdout is unbuffered.
	fmt.Printf("plugvisor|%d|unix|%s\n", version, path)
	logf("info", "serving", map[string]interface{}{"socket": path, "pid": os.Getpid()})

	var grace time.Duration
	var reason string
	select {
	case grace = <-p.stop:
		reason = "Shutdown RPC"
	case sig := <-signals:
		grace, reason = sigtermGrace, sig.String()
	case err := <-served:
		logf("error", "the server stopped", map[string]interface{}{"error": fmt.Sprint(err)})
		os.Exit(1)
	}
	logf("info", "draining", map[string]interface{}{"reason": reason, "grace_seconds": grace.Seconds()})
	healthServer.Shutdown()
	drained := make(chan struct{})
	go func() {
		server.GracefulStop() // stops accepting, waits for in-flight calls
		close(drained)
	}()
	select {
	case <-drained:
	case <-time.After(grace):
		logf("warn", "drain deadline passed; cancelling what is left", nil)
		server.Stop()
	case sig := <-signals:
		// A signal while draining: the deadline has passed.
		logf("warn", "cancelling what is left", map[string]interface{}{"signal": sig.String()})
		server.Stop()
	}
	logf("info", "stopped", nil)
	os.Exit(0)
}
