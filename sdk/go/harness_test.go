package procbroker

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// frame is an envelope as the test reads it: decoded by the msgpack
// library, not by the SDK, with the keys it carried.
type frame struct {
	Type          string `msgpack:"type"`
	ID            string `msgpack:"id"`
	CorrelationID uint64 `msgpack:"correlation_id"`
	Source        string `msgpack:"source"`
	Target        string `msgpack:"target"`
	Error         string `msgpack:"error"`
	Code          string `msgpack:"code"`
	TimeoutMs     uint64 `msgpack:"timeout_ms"`
	Stream        bool   `msgpack:"stream"`
	More          bool   `msgpack:"more"`
	Key           string `msgpack:"key"`

	keys    map[string]msgpack.RawMessage
	payload []byte // as it came, nil when absent
}

func (f *frame) has(key string) bool { _, ok := f.keys[key]; return ok }

func (f *frame) String() string {
	return fmt.Sprintf("%s %s #%d → %s (more %v, code %q %q, payload % x)",
		f.Type, f.ID, f.CorrelationID, f.Target, f.More, f.Code, f.Error, f.payload)
}

// value decodes the payload.
func (f *frame) value(t testing.TB) any {
	t.Helper()
	if f.payload == nil {
		return nil
	}
	var v any
	if err := msgpack.Unmarshal(f.payload, &v); err != nil {
		t.Fatalf("payload of %v: %v", f, err)
	}
	return v
}

// msg is an envelope the test writes: its keys, encoded by the msgpack
// library (a Raw or msgpack.RawMessage value goes as it is).
type msg map[string]any

func encodeFrame(t testing.TB, m msg) []byte {
	t.Helper()
	body, err := msgpack.Marshal(map[string]any(m))
	if err != nil {
		t.Fatal(err)
	}
	return frameOf(body)
}

// fakeBroker plays the broker to a Service over os pipes: it writes frames
// to the service's stdin and reads what it writes to its stdout.
type fakeBroker struct {
	t      testing.TB
	stdin  io.WriteCloser // the write end of the service's stdin
	stdout io.Reader      // the read end of the service's stdout
	frames chan *frame
	raw    chan []byte // every byte the service wrote, in reads
	served chan error  // Serve's result, or the child's exit
	logs   *syncBuffer
	nextID uint64
	closed bool
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// serve starts svc on pipes (with main, if any) and waits for its ready.
func serve(t testing.TB, svc *Service, main func(context.Context, *Service) error) *fakeBroker {
	t.Helper()
	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	b := &fakeBroker{t: t, stdin: inW, stdout: outR,
		frames: make(chan *frame, 100000), served: make(chan error, 1), logs: &syncBuffer{}, nextID: 100}
	svc.Logger = log.New(b.logs, "", 0)
	go func() {
		err := svc.Serve(inR, outW, main)
		outW.Close()
		inR.Close()
		b.served <- err
	}()
	go b.read()
	t.Cleanup(func() {
		b.eof()
		select {
		case <-b.served:
			// Read what is left, up to the service's end of stdout.
			for range b.frames {
			}
		case <-time.After(5 * time.Second):
			t.Errorf("the service still serves 5 s after EOF")
		}
		outR.Close()
	})
	b.expectReady()
	return b
}

func (b *fakeBroker) expectReady() {
	b.t.Helper()
	ready := b.expect("ready")
	if ready.Type != "event" || ready.ID != "ready" || ready.Target != "broker" || ready.has("payload") {
		b.t.Fatalf("the first frame is not ready: %v", ready)
	}
}

// spawn starts argv as a child with id (its PROCBROKER_PROCESS_ID), plays
// the broker on its stdin and stdout, and waits for its ready.
func spawn(t testing.TB, id string, argv []string, env ...string) (*fakeBroker, *exec.Cmd) {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(append(os.Environ(), ProcessIDEnv+"="+id), env...)
	b := &fakeBroker{t: t, frames: make(chan *frame, 100000), served: make(chan error, 1),
		logs: &syncBuffer{}, nextID: 100}
	cmd.Stderr = b.logs
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	b.stdin, b.stdout = stdin, stdout
	read := make(chan struct{})
	go func() { b.read(); close(read) }()
	go func() {
		<-read // Wait must not close stdout before everything is read
		b.served <- cmd.Wait()
	}()
	t.Cleanup(func() {
		b.eof()
		select {
		case <-b.served:
		case <-time.After(5 * time.Second):
			t.Errorf("%s still runs 5 s after EOF", id)
			_ = cmd.Process.Kill()
		}
	})
	b.expectReady()
	return b, cmd
}

// read decodes every frame the service writes; anything that is not a
// valid frame fails the test (stdout carries frames only).
func (b *fakeBroker) read() {
	defer close(b.frames)
	r := newFrameReader(b.stdout, 64<<20)
	for {
		body, err := r.next()
		if err == io.EOF {
			return
		}
		if err != nil {
			b.t.Errorf("the service's stdout is out of sync: %v", err)
			return
		}
		f := &frame{}
		if err := msgpack.Unmarshal(body, f); err != nil {
			b.t.Errorf("the service wrote an invalid envelope: %v (% x)", err, body)
			return
		}
		if err := msgpack.Unmarshal(body, &f.keys); err != nil {
			b.t.Errorf("the service wrote an invalid envelope: %v", err)
			return
		}
		if _, ok := f.keys["payload"]; ok {
			// The exact bytes (msgpack's RawMessage decodes nil as empty).
			p, err := Raw(body).Field("payload")
			if err != nil {
				b.t.Errorf("%v", err)
			}
			f.payload = append([]byte{}, p...)
		}
		b.frames <- f
	}
}

// send writes one frame.
func (b *fakeBroker) send(m msg) {
	b.t.Helper()
	b.write(encodeFrame(b.t, m))
}

func (b *fakeBroker) write(p []byte) {
	b.t.Helper()
	if _, err := b.stdin.Write(p); err != nil {
		b.t.Fatalf("write to the service: %v", err)
	}
}

// recv returns the next frame within d, or nil.
func (b *fakeBroker) recv(d time.Duration) *frame {
	b.t.Helper()
	select {
	case f := <-b.frames:
		return f
	case <-time.After(d):
		return nil
	}
}

// expect returns the next frame, which must come within 5 s.
func (b *fakeBroker) expect(what string) *frame {
	b.t.Helper()
	f := b.recv(5 * time.Second)
	if f == nil {
		b.t.Fatalf("no %s within 5 s; the service logged:\n%s", what, b.logs)
	}
	return f
}

// quiet fails the test if a frame comes within d.
func (b *fakeBroker) quiet(d time.Duration) {
	b.t.Helper()
	if f := b.recv(d); f != nil {
		b.t.Fatalf("unexpected frame %v", f)
	}
}

// request is a request from client.0 with a fresh correlation id.
func (b *fakeBroker) request(method string, payload any, extra ...any) msg {
	b.nextID++
	m := msg{"type": "request", "id": method, "correlation_id": b.nextID,
		"source": "client.0", "target": "svc.0"}
	if payload != nil {
		m["payload"] = payload
	}
	for i := 0; i+1 < len(extra); i += 2 {
		m[extra[i].(string)] = extra[i+1]
	}
	return m
}

// call sends m and returns its reply, which must be the next frame.
func (b *fakeBroker) call(m msg) *frame {
	b.t.Helper()
	b.send(m)
	f := b.expect("reply to " + m["id"].(string))
	if f.CorrelationID != m["correlation_id"].(uint64) || f.Target != m["source"] || f.ID != m["id"] {
		b.t.Fatalf("%v is not the reply to %v", f, m)
	}
	return f
}

// cancel sends the broker's cancel of request m.
func (b *fakeBroker) cancel(m msg, reason string) {
	b.send(msg{"type": "event", "id": "cancel", "source": "broker", "target": "svc.0",
		"correlation_id": m["correlation_id"], "payload": map[string]any{"source": m["source"], "reason": reason}})
}

// eof closes the service's stdin.
func (b *fakeBroker) eof() {
	if !b.closed {
		b.closed = true
		b.stdin.Close()
	}
}

// result waits for Serve to return.
func (b *fakeBroker) result(within time.Duration) error {
	b.t.Helper()
	select {
	case err := <-b.served:
		b.served <- err
		return err
	case <-time.After(within):
		b.t.Fatalf("Serve still runs after %v", within)
		return nil
	}
}

func (b *fakeBroker) logged(s string) bool { return strings.Contains(b.logs.String(), s) }

func bigEndian(n uint32) []byte {
	var h [4]byte
	binary.BigEndian.PutUint32(h[:], n)
	return h[:]
}
