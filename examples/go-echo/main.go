// Command go-echo is a plugvisor plugin in Go, on grpc-go and nothing else
// from plugvisor: the handshake, the cookie check, every RPC of
// plugvisor.v1.Plugin, grpc.health.v1, JSON logs, and a drain on Shutdown or
// SIGTERM.
//
// Methods: "echo" (the payload back), "upper" (upper-cased ASCII), "config"
// (the config Initialize delivered, as JSON), all on Handle and the first two
// on HandleStream. Its state is the number of calls it has answered, which
// survives restarts through ExportState and Initialize.
//
// Build it with ./build.sh (Debian's golang-go and grpc packages, GOPATH
// mode); see README.md.
package main

import (
	"bytes"
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
	cookie       = "d3c7f1b2-plugvisor-5a9e-4c1d-8f60-plugin-v1"
	protocol     = 1
	stateVersion = 1
	maxMessage   = 64 << 20
	// Grace when SIGTERM arrives first: the supervisor sends SIGKILL after
	// the other half of timeouts.stop (5s by default).
	sigtermGrace = 4 * time.Second
)

var methods = []string{"echo", "upper", "config"}

// streamMethods are the methods HandleStream accepts (declared in
// InitializeResponse.stream_methods).
var streamMethods = []string{"echo", "upper"}

// logf writes one JSON log record to stderr, the shape the supervisor keeps.
func logf(level, message string, fields map[string]interface{}) {
	record := map[string]interface{}{
		"timestamp": time.Now().UTC().Format("2006-01-02T15:04:05.000Z"),
		"level":     level,
		"message":   message,
		"target":    "go-echo",
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
	calls       atomic.Uint64

	mu     sync.Mutex
	config map[string]interface{}

	// stop asks main to drain within the given grace; buffered so Shutdown
	// never blocks on it.
	stop chan time.Duration
}

func (p *plugin) ready() error {
	if !p.initialized.Load() {
		return status.Error(codes.FailedPrecondition, "not initialized: Initialize comes first")
	}
	return nil
}

func (p *plugin) Initialize(ctx context.Context, req *pb.InitializeRequest) (*pb.InitializeResponse, error) {
	if req.ProtocolVersion != 0 && req.ProtocolVersion != protocol {
		return nil, status.Errorf(codes.FailedPrecondition, "Initialize asked for protocol version %d; go-echo speaks %d", req.ProtocolVersion, protocol)
	}
	config := map[string]interface{}{}
	if strings.TrimSpace(req.ConfigJson) != "" {
		if err := json.Unmarshal([]byte(req.ConfigJson), &config); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "config_json is not a JSON object: %v", err)
		}
	}
	restored := false
	if rs := req.RestoredState; rs != nil {
		if rs.StateVersion != stateVersion {
			return nil, status.Errorf(codes.FailedPrecondition,
				"restored state has state_version %d; this plugin reads only %d", rs.StateVersion, stateVersion)
		}
		if len(rs.State) > 0 {
			n, err := strconv.ParseUint(string(rs.State), 10, 64)
			if err != nil {
				return nil, status.Errorf(codes.FailedPrecondition, "restored state %q is not a call count: %v", rs.State, err)
			}
			p.calls.Store(n)
			restored = true
		}
	}
	p.mu.Lock()
	p.config = config
	p.mu.Unlock()
	p.initialized.Store(true)
	logf("info", "initialized", map[string]interface{}{
		"instance_id": req.InstanceId, "restored": restored, "count": p.calls.Load(),
	})
	return &pb.InitializeResponse{
		Name:            "go-echo",
		Version:         "0.1.0",
		Methods:         methods,
		StreamMethods:   streamMethods,
		StateVersion:    stateVersion,
		ProtocolVersion: protocol,
	}, nil
}

func (p *plugin) Handle(ctx context.Context, req *pb.HandleRequest) (*pb.HandleResponse, error) {
	if err := p.ready(); err != nil {
		return nil, err
	}
	var out []byte
	switch req.Method {
	case "echo":
		out = req.Payload
	case "upper":
		out = bytes.ToUpper(req.Payload)
	case "config":
		p.mu.Lock()
		encoded, err := json.Marshal(p.config)
		p.mu.Unlock()
		if err != nil {
			return nil, status.Errorf(codes.Internal, "cannot encode the config: %v", err)
		}
		out = encoded
	default:
		return nil, status.Errorf(codes.Unimplemented, "go-echo has no method %q (it has %s)", req.Method, strings.Join(methods, ", "))
	}
	p.calls.Add(1)
	return &pb.HandleResponse{Payload: out, StateChanged: true}, nil
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
	var transform func([]byte) []byte
	switch first.Method {
	case "echo":
		transform = func(b []byte) []byte { return b }
	case "upper":
		transform = bytes.ToUpper
	default:
		return status.Errorf(codes.Unimplemented, "go-echo cannot stream method %q (it streams %s)", first.Method, strings.Join(streamMethods, ", "))
	}
	// Reply as the input arrives: nothing is held beyond one chunk.
	for chunk := first; ; {
		if len(chunk.Data) > 0 {
			if err := stream.Send(&pb.Chunk{Data: transform(chunk.Data)}); err != nil {
				return err
			}
		}
		chunk, err = stream.Recv()
		if err == io.EOF {
			p.calls.Add(1)
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
	return &pb.ExportStateResponse{
		State:        []byte(strconv.FormatUint(p.calls.Load(), 10)),
		StateVersion: stateVersion,
	}, nil
}

func (p *plugin) Shutdown(ctx context.Context, req *pb.ShutdownRequest) (*pb.ShutdownResponse, error) {
	// Finish a little before the deadline, when SIGTERM would follow.
	grace := time.Duration(req.DeadlineMs) * time.Millisecond * 95 / 100
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

func main() {
	if os.Getenv("PLUGVISOR_MAGIC_COOKIE") != cookie {
		fmt.Fprintln(os.Stderr, "This is a plugvisor plugin; it is started by the plugvisor supervisor, not by hand.")
		os.Exit(1)
	}
	version, ok := chooseVersion(os.Getenv("PLUGVISOR_PROTOCOL_VERSIONS"))
	if !ok {
		fmt.Fprintf(os.Stderr, "go-echo speaks plugvisor protocol version %d; the supervisor offered %q\n",
			protocol, os.Getenv("PLUGVISOR_PROTOCOL_VERSIONS"))
		os.Exit(1)
	}
	path := os.Getenv("PLUGVISOR_PLUGIN_SOCKET")
	if path == "" {
		fmt.Fprintln(os.Stderr, "PLUGVISOR_PLUGIN_SOCKET is not set")
		os.Exit(1)
	}

	// SIGTERM is caught before listening, so an early one is not fatal.
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)

	// A previous child may have left its socket file behind.
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		fmt.Fprintf(os.Stderr, "cannot remove the stale socket %s: %v\n", path, err)
		os.Exit(1)
	}
	listener, err := net.Listen("unix", path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot listen on %s: %v\n", path, err)
		os.Exit(1)
	}

	p := &plugin{stop: make(chan time.Duration, 1)}
	server := grpc.NewServer(grpc.MaxRecvMsgSize(maxMessage), grpc.MaxSendMsgSize(maxMessage))
	pb.RegisterPluginServer(server, p)
	healthServer := health.NewServer()
	healthpb.RegisterHealthServer(server, healthServer)

	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()

	// Listening: now, and only now, the handshake. os.Stdout is unbuffered.
	fmt.Printf("plugvisor|%d|unix|%s\n", version, path)
	logf("info", "serving", map[string]interface{}{
		"socket": path, "pid": os.Getpid(), "instance_id": os.Getenv("PLUGVISOR_INSTANCE_ID"),
	})

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
	started := time.Now()
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
	logf("info", "stopped", map[string]interface{}{"drained_seconds": time.Since(started).Seconds()})
	os.Exit(0)
}
