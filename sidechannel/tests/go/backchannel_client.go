// backchannel_client dials a server the way gitlab-shell and workhorse dial
// Gitaly (Gitaly's client.DialSidechannel): after TCP it writes the 11 bytes
// "backchannel", runs hashicorp-yamux as the yamux client with keep-alive off,
// and speaks gRPC (grpc-go) on the first stream. Streams the server opens are
// sidechannels: "sidechannel", an 8-byte big-endian id, our "ok"; then we send
// 4-hex-length chunks ending with "0000" and read raw bytes until the server
// closes. It also dials plainly, as Rails does.
//
// refvote-sidechannel's tests build it in GOPATH mode against Debian's
// packaged sources and run it against their server:
//
//	backchannel_client ADDR MEBIBYTES
//
// It prints "ok ..." and exits 0 when every check passed, else exits 1.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const maxPayload = 65516 // 65520 per chunk, the 4-byte length included

// registry matches server-opened streams to the calls waiting for them.
type registry struct {
	mu      sync.Mutex
	next    int64
	waiting map[int64]chan net.Conn
}

func (r *registry) register() (int64, chan net.Conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.next++
	ch := make(chan net.Conn, 1)
	r.waiting[r.next] = ch
	return r.next, ch
}

func (r *registry) serve(session *yamux.Session) {
	for {
		stream, err := session.Accept()
		if err != nil {
			return
		}
		go r.handshake(stream)
	}
}

func (r *registry) handshake(stream net.Conn) {
	_ = stream.SetReadDeadline(time.Now().Add(5 * time.Second))
	magic := make([]byte, 11)
	if _, err := io.ReadFull(stream, magic); err != nil || string(magic) != "sidechannel" {
		stream.Close()
		return
	}
	var id int64
	if err := binary.Read(stream, binary.BigEndian, &id); err != nil {
		stream.Close()
		return
	}
	_ = stream.SetReadDeadline(time.Time{})
	r.mu.Lock()
	ch := r.waiting[id]
	delete(r.waiting, id)
	r.mu.Unlock()
	if ch == nil {
		stream.Close()
		return
	}
	if _, err := stream.Write([]byte("ok")); err != nil {
		stream.Close()
		return
	}
	ch <- stream
}

// backchannel is a grpc-go TransportCredentials doing the client handshake.
type backchannel struct{ reg *registry }

type noSecurity struct{ credentials.CommonAuthInfo }

func (noSecurity) AuthType() string { return "insecure" }

func (b backchannel) ClientHandshake(_ context.Context, _ string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	if _, err := conn.Write([]byte("backchannel")); err != nil {
		return nil, nil, fmt.Errorf("write magic: %w", err)
	}
	cfg := yamux.DefaultConfig()
	cfg.EnableKeepAlive = false
	cfg.LogOutput = io.Discard
	session, err := yamux.Client(conn, cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("yamux client: %w", err)
	}
	stream, err := session.Open()
	if err != nil {
		return nil, nil, fmt.Errorf("open gRPC stream: %w", err)
	}
	go b.reg.serve(session)
	return stream, noSecurity{credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}, nil
}

func (backchannel) ServerHandshake(net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("client only")
}
func (backchannel) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "insecure"}
}
func (b backchannel) Clone() credentials.TransportCredentials { return b }
func (backchannel) OverrideServerName(string) error           { return nil }

// pattern is the deterministic data this program sends.
func pattern(n int, seed byte) []byte {
	out := make([]byte, n)
	x := uint32(seed)*2654435761 + 1
	for i := range out {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		out[i] = byte(x >> 24)
	}
	return out
}

// echo calls check("echo:http") with a sidechannel and sends data over it.
func echo(ctx context.Context, conn *grpc.ClientConn, reg *registry, data []byte) error {
	id, arrived := reg.register()
	ctx = metadata.AppendToOutgoingContext(ctx, "gitaly-sidechannel-id", strconv.FormatInt(id, 10))
	answer := make(chan error, 1)
	go func() {
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "echo:http"})
		if err == nil && resp.Status != healthpb.HealthCheckResponse_SERVING {
			err = fmt.Errorf("status %v", resp.Status)
		}
		answer <- err
	}()
	var side net.Conn
	select {
	case side = <-arrived:
	case err := <-answer:
		return fmt.Errorf("the call ended before its sidechannel opened: %v", err)
	case <-time.After(10 * time.Second):
		return errors.New("no sidechannel within 10s")
	}
	defer side.Close()
	wrote := make(chan error, 1)
	go func() {
		for rest := data; len(rest) > 0; {
			n := len(rest)
			if n > maxPayload {
				n = maxPayload
			}
			if _, err := fmt.Fprintf(side, "%04x", n+4); err != nil {
				wrote <- err
				return
			}
			if _, err := side.Write(rest[:n]); err != nil {
				wrote <- err
				return
			}
			rest = rest[n:]
		}
		_, err := side.Write([]byte("0000"))
		wrote <- err
	}()
	back, err := io.ReadAll(side)
	if err != nil {
		return fmt.Errorf("reading the echo: %w", err)
	}
	if err := <-wrote; err != nil {
		return fmt.Errorf("sending: %w", err)
	}
	if sha256.Sum256(back) != sha256.Sum256(data) {
		return fmt.Errorf("echo differs: sent %d bytes, got %d", len(data), len(back))
	}
	return <-answer
}

func run(addr string, mib int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// Rails' way: plain HTTP/2.
	plain, err := grpc.DialContext(ctx, addr, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		return fmt.Errorf("plain dial: %w", err)
	}
	defer plain.Close()
	health := healthpb.NewHealthClient(plain)
	resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: "kind"})
	if err != nil || resp.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		return fmt.Errorf("plain kind: %v %v", resp, err)
	}
	withID := metadata.AppendToOutgoingContext(ctx, "gitaly-sidechannel-id", "1")
	_, err = health.Check(withID, &healthpb.HealthCheckRequest{Service: "echo:http"})
	if status.Code(err) != codes.Internal {
		return fmt.Errorf("a sidechannel on a plain connection: want Internal, got %v", err)
	}

	// gitlab-shell's way.
	reg := &registry{waiting: map[int64]chan net.Conn{}}
	conn, err := grpc.DialContext(ctx, addr, grpc.WithTransportCredentials(backchannel{reg}), grpc.WithBlock())
	if err != nil {
		return fmt.Errorf("backchannel dial: %w", err)
	}
	defer conn.Close()
	resp, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "kind"})
	if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("backchannel kind: %v %v", resp, err)
	}
	big := pattern(mib<<20, 1)
	if err := echo(ctx, conn, reg, big); err != nil {
		return fmt.Errorf("echo of %d MiB: %w", mib, err)
	}
	// Several at once on the same connection.
	errs := make(chan error, 3)
	for i := 0; i < 3; i++ {
		go func(i int) { errs <- echo(ctx, conn, reg, pattern(1<<20+i, byte(2+i))) }(i)
	}
	for i := 0; i < 3; i++ {
		if err := <-errs; err != nil {
			return fmt.Errorf("concurrent echo: %w", err)
		}
	}
	fmt.Printf("ok echoed %d bytes each way, then 3 concurrent\n", len(big))
	return nil
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: backchannel_client ADDR MEBIBYTES")
		os.Exit(2)
	}
	mib, err := strconv.Atoi(os.Args[2])
	if err == nil {
		err = run(os.Args[1], mib)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		os.Exit(1)
	}
}
