package procbroker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// echoService serves Echo (concurrent) and EchoInline.
func echoService() *Service {
	svc := NewService()
	svc.Handle("Echo", func(ctx context.Context, req *Request) (any, error) { return req.Payload, nil })
	svc.HandleInline("EchoInline", func(ctx context.Context, req *Request) (any, error) { return req.Payload, nil })
	return svc
}

func TestPingEchoAndUnknownMethods(t *testing.T) {
	b := serve(t, echoService(), nil)
	ping := b.request("Ping", nil)
	ping["correlation_id"] = uint64(math.MaxUint64)
	reply := b.call(ping)
	if reply.Type != "response" || !bytes.Equal(reply.payload, []byte{0x80}) {
		t.Fatalf("Ping: %v", reply)
	}
	for _, method := range []string{"Echo", "EchoInline"} {
		// The payload's bytes verbatim, a non-shortest int among them.
		odd := msgpack.RawMessage{0x92, 0xcd, 0x00, 0x07, 0xd9, 0x01, 'x'}
		reply = b.call(b.request(method, odd))
		if !bytes.Equal(reply.payload, odd) {
			t.Fatalf("%s: % x", method, reply.payload)
		}
		// No payload: none back; nil: nil back.
		reply = b.call(b.request(method, nil))
		if reply.has("payload") {
			t.Fatalf("%s of nothing: %v", method, reply)
		}
		reply = b.call(b.request(method, msgpack.RawMessage{0xc0}))
		if !bytes.Equal(reply.payload, []byte{0xc0}) {
			t.Fatalf("%s of nil: %v", method, reply)
		}
	}
	reply = b.call(b.request("Nope", nil))
	if reply.Type != "error" || reply.Code != CodeUnknownMethod || !strings.Contains(reply.Error, "Nope") {
		t.Fatalf("unknown method: %v", reply)
	}
}

func TestHandlerErrorsAndPanics(t *testing.T) {
	svc := NewService()
	svc.Handle("Plain", func(ctx context.Context, req *Request) (any, error) {
		return nil, errors.New("plain failure")
	})
	svc.Handle("Coded", func(ctx context.Context, req *Request) (any, error) {
		return nil, Errorf("teapot", "short and %s", "stout")
	})
	svc.Handle("Wrapped", func(ctx context.Context, req *Request) (any, error) {
		return nil, fmt.Errorf("looking up: %w", &CallError{Code: "not_found", Message: "no such key"})
	})
	svc.Handle("Panic", func(ctx context.Context, req *Request) (any, error) {
		panic("boom")
	})
	svc.HandleInline("PanicInline", func(ctx context.Context, req *Request) (any, error) {
		panic("inline boom")
	})
	svc.Handle("Unencodable", func(ctx context.Context, req *Request) (any, error) {
		return make(chan int), nil
	})
	svc.Handle("BadRaw", func(ctx context.Context, req *Request) (any, error) {
		return Raw{0x92, 0x01}, nil
	})
	svc.HandleInline("CallInline", func(ctx context.Context, req *Request) (any, error) {
		return svc.Call(ctx, "echo", "Echo", nil)
	})
	b := serve(t, svc, nil)
	want := map[string][2]string{
		"Plain":       {CodeHandler, "plain failure"},
		"Coded":       {"teapot", "short and stout"},
		"Wrapped":     {"not_found", "looking up: not_found: no such key"},
		"Panic":       {CodeInternal, "the handler panicked: boom"},
		"PanicInline": {CodeInternal, "the handler panicked: inline boom"},
	}
	for method, w := range want {
		reply := b.call(b.request(method, nil))
		if reply.Type != "error" || reply.Code != w[0] || reply.Error != w[1] {
			t.Fatalf("%s: %v", method, reply)
		}
	}
	for _, method := range []string{"Unencodable", "BadRaw", "CallInline"} {
		if reply := b.call(b.request(method, nil)); reply.Code != CodeInternal {
			t.Fatalf("%s: %v", method, reply)
		}
	}
	// The service goes on.
	b.call(b.request("Ping", nil))
	if !b.logged("boom") {
		t.Fatalf("the panic was not logged: %s", b.logs)
	}
}

// Bad input from the broker: answered when it is recognisably a request,
// logged otherwise, and the service serves on.
func TestBadFramesAreAnsweredOrLogged(t *testing.T) {
	b := serve(t, echoService(), nil)
	// A body that is not a map.
	b.write(frameOf(pack(t, []any{"request", "Echo", 1})))
	// Not MessagePack at all, and an empty frame.
	b.write(frameOf([]byte{0xc1, 0xc1}))
	b.write(frameOf(nil))
	// An unknown type.
	b.send(msg{"type": "gossip", "id": "x", "correlation_id": uint64(5), "source": "client.0"})
	// A reply for a correlation id nobody used.
	b.send(msg{"type": "response", "id": "Echo", "correlation_id": uint64(424242), "source": "echo.0"})
	b.send(msg{"type": "error", "id": "Echo", "correlation_id": uint64(424243), "source": "broker", "code": "timeout", "error": "late"})
	// None of that is answered...
	b.quiet(100 * time.Millisecond)
	// ...but a request with a field of the wrong type is, with bad_request.
	bad := b.request("Echo", "x", "timeout_ms", "soon")
	reply := b.call(bad)
	if reply.Type != "error" || reply.Code != CodeBadRequest || !strings.Contains(reply.Error, "timeout_ms") {
		t.Fatalf("%v", reply)
	}
	reply = b.call(b.request("Echo", "still here"))
	if reply.value(t) != "still here" {
		t.Fatalf("%v", reply)
	}
	for _, logged := range []string{"not a map", "0xc1", "empty frame", "gossip"} {
		if !b.logged(logged) {
			t.Fatalf("%q not logged:\n%s", logged, b.logs)
		}
	}
}

func TestAFrameCutByEOF(t *testing.T) {
	b := serve(t, echoService(), nil)
	whole := encodeFrame(t, b.request("Echo", "first"))
	cut := encodeFrame(t, b.request("Echo", strings.Repeat("x", 100)))
	b.write(whole)
	b.write(cut[:len(cut)/2])
	if reply := b.expect("reply to the whole frame"); reply.value(t) != "first" {
		t.Fatalf("%v", reply)
	}
	b.eof()
	err := b.result(2 * time.Second)
	if !errors.Is(err, ErrOutOfSync) || !strings.Contains(err.Error(), "EOF inside a frame") {
		t.Fatalf("Serve returned %v", err)
	}
}

func TestALengthOverTheLimit(t *testing.T) {
	svc := echoService()
	svc.MaxFrameBytes = 1 << 20
	b := serve(t, svc, nil)
	b.write(bigEndian(1<<20 + 1))
	err := b.result(2 * time.Second)
	if !errors.Is(err, ErrOutOfSync) || !strings.Contains(err.Error(), "over the limit") {
		t.Fatalf("Serve returned %v", err)
	}
}

func TestEightMiBPayloads(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), 8<<20/16)
	svc := echoService()
	got := make(chan error, 1)
	b := serve(t, svc, func(ctx context.Context, s *Service) error {
		reply, err := s.Call(ctx, "echo", "Echo", big)
		if err == nil {
			var back []byte
			err = reply.Decode(&back)
			if err == nil && !bytes.Equal(back, big) {
				err = errors.New("the reply differs")
			}
		}
		got <- err
		return nil
	})
	// A call out with 8 MiB, answered with them.
	out := b.expect("the call out")
	if out.Type != "request" || len(out.payload) != len(big)+5 {
		t.Fatalf("%d bytes of payload", len(out.payload))
	}
	b.send(msg{"type": "response", "id": out.ID, "correlation_id": out.CorrelationID, "source": "echo.0",
		"target": "svc.0", "payload": msgpack.RawMessage(out.payload)})
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	// A request of 8 MiB, echoed byte for byte by both kinds of handler.
	for _, method := range []string{"Echo", "EchoInline"} {
		reply := b.call(b.request(method, big))
		if !bytes.Equal(reply.payload, out.payload) {
			t.Fatalf("%s: %d bytes back", method, len(reply.payload))
		}
	}
}

func TestShutdownOnlyFromTheBrokerThenDrain(t *testing.T) {
	svc := echoService()
	release := make(chan struct{})
	svc.Handle("Hold", func(ctx context.Context, req *Request) (any, error) {
		<-release
		return "held", nil
	})
	mainDone := make(chan struct{})
	b := serve(t, svc, func(ctx context.Context, s *Service) error {
		<-ctx.Done()
		close(mainDone)
		return nil
	})
	// From a process: ignored.
	b.send(msg{"type": "event", "id": "shutdown", "source": "client.0", "target": "svc.0"})
	b.call(b.request("Ping", nil))
	select {
	case err := <-b.served:
		t.Fatalf("Serve returned %v after a forged shutdown", err)
	case <-mainDone:
		t.Fatal("main's ctx ended after a forged shutdown")
	default:
	}
	if !b.logged(`shutdown from "client.0" ignored`) {
		t.Fatalf("%s", b.logs)
	}
	// From the broker: what runs is answered, new requests are refused,
	// no new calls are made, and Serve returns once drained (no EOF).
	hold := b.request("Hold", nil)
	b.send(hold)
	time.Sleep(20 * time.Millisecond)
	b.send(msg{"type": "event", "id": "shutdown", "source": "broker", "target": "svc.0"})
	<-mainDone
	late := b.call(b.request("Echo", "late"))
	if late.Code != CodeShuttingDown {
		t.Fatalf("a request after shutdown: %v", late)
	}
	if _, err := svc.Call(context.Background(), "echo", "Echo", 1); !isCode(err, CodeShuttingDown) {
		t.Fatalf("a call after shutdown: %v", err)
	}
	select {
	case err := <-b.served:
		t.Fatalf("Serve returned %v before the handler finished", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	if reply := b.expect("Hold's reply"); reply.value(t) != "held" {
		t.Fatalf("%v", reply)
	}
	if err := b.result(2 * time.Second); err != nil {
		t.Fatal(err)
	}
}

// toInt is an integer that msgpack decoded (in whatever Go type).
func toInt(v any) int64 {
	switch n := v.(type) {
	case int8:
		return int64(n)
	case int16:
		return int64(n)
	case int32:
		return int64(n)
	case int64:
		return n
	case uint8:
		return int64(n)
	case uint16:
		return int64(n)
	case uint32:
		return int64(n)
	case uint64:
		return int64(n)
	}
	return math.MinInt64
}

func isCode(err error, code string) bool {
	var ce *CallError
	return errors.As(err, &ce) && ce.Code == code
}

// At EOF, Serve returns soon even with a handler that ignores everything.
func TestEOFWithAHandlerStillRunning(t *testing.T) {
	svc := NewService()
	stuck := make(chan struct{})
	t.Cleanup(func() { close(stuck) })
	svc.Handle("Stuck", func(ctx context.Context, req *Request) (any, error) {
		<-stuck
		return nil, nil
	})
	watched := make(chan string, 1)
	svc.Handle("Watching", func(ctx context.Context, req *Request) (any, error) {
		<-ctx.Done()
		watched <- CancelReason(ctx)
		return "stopped", nil
	})
	b := serve(t, svc, nil)
	b.send(b.request("Stuck", nil))
	b.send(b.request("Watching", nil))
	time.Sleep(20 * time.Millisecond)
	closed := time.Now()
	b.eof()
	if err := b.result(time.Second); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(closed); took > 500*time.Millisecond {
		t.Fatalf("Serve took %v after EOF", took)
	}
	if reason := <-watched; reason != ReasonShuttingDown {
		t.Fatalf("reason %q", reason)
	}
	// The handler that watched its context still got its reply out.
	if reply := b.expect("Watching's reply"); reply.value(t) != "stopped" {
		t.Fatalf("%v", reply)
	}
}

func TestHandlersRunConcurrently(t *testing.T) {
	svc := NewService()
	svc.Handle("Sleep", func(ctx context.Context, req *Request) (any, error) {
		time.Sleep(200 * time.Millisecond)
		return nil, nil
	})
	b := serve(t, svc, nil)
	started := time.Now()
	for i := 0; i < 8; i++ {
		b.send(b.request("Sleep", nil))
	}
	for i := 0; i < 8; i++ {
		b.expect("a Sleep's reply")
	}
	if took := time.Since(started); took > 600*time.Millisecond {
		t.Fatalf("8 × Sleep 200 took %v", took)
	}
}

func TestTheDeadlineReachesTheHandler(t *testing.T) {
	svc := NewService()
	svc.Handle("Deadline", func(ctx context.Context, req *Request) (any, error) {
		d, ok := ctx.Deadline()
		if !ok {
			return nil, nil
		}
		return time.Until(d).Milliseconds(), nil
	})
	// A handler that blocks past its deadline sees its context end then.
	svc.Handle("Block", func(ctx context.Context, req *Request) (any, error) {
		started := time.Now()
		<-ctx.Done()
		return map[string]any{"waited": time.Since(started).Milliseconds(), "err": ctx.Err().Error(),
			"reason": CancelReason(ctx)}, nil
	})
	b := serve(t, svc, nil)
	left := b.call(b.request("Deadline", nil, "timeout_ms", 5000)).value(t)
	if ms := toInt(left); ms < 4900 || ms > 5000 {
		t.Fatalf("%v ms left of 5000", left)
	}
	if left := b.call(b.request("Deadline", nil)).value(t); left != nil {
		t.Fatalf("%v left without a deadline", left)
	}
	got := b.call(b.request("Block", nil, "timeout_ms", 80)).value(t).(map[string]any)
	if waited := toInt(got["waited"]); waited < 70 || got["err"] != context.DeadlineExceeded.Error() || got["reason"] != "" {
		t.Fatalf("%v", got)
	}
}

// The broker's cancel ends the handler's context, with its reason, and
// its reply is not sent; a cancel from anyone else, or for another
// request, is ignored.
func TestCancelFromTheBroker(t *testing.T) {
	svc := NewService()
	type seen struct {
		reason string
		err    error
	}
	stopped := make(chan seen, 10)
	svc.Handle("Wait", func(ctx context.Context, req *Request) (any, error) {
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Second):
		}
		stopped <- seen{CancelReason(ctx), ctx.Err()}
		return "done", nil
	})
	ignoring := make(chan struct{})
	svc.Handle("Ignore", func(ctx context.Context, req *Request) (any, error) {
		<-ignoring
		return "late", nil
	})
	b := serve(t, svc, nil)
	for _, reason := range []string{ReasonTimeout, ReasonCancelled, ReasonCallerExited, ReasonBusy, ReasonShuttingDown, "reason_from_the_future"} {
		wait := b.request("Wait", nil)
		b.send(wait)
		b.cancel(wait, reason)
		got := <-stopped
		wantErr := context.Canceled
		if reason == ReasonTimeout {
			wantErr = context.DeadlineExceeded
		}
		if got.reason != reason || got.err != wantErr {
			t.Fatalf("%s: %+v\n%s", reason, got, b.logs)
		}
	}
	// None of the cancelled requests was answered.
	if reply := b.call(b.request("Ping", nil)); reply.ID != "Ping" {
		t.Fatalf("%v", reply)
	}
	// Forged, for another requester, for an unknown id, without payload: ignored.
	wait := b.request("Wait", nil)
	b.send(wait)
	b.send(msg{"type": "event", "id": "cancel", "source": "client.0", "target": "svc.0",
		"correlation_id": wait["correlation_id"], "payload": map[string]any{"source": "client.0", "reason": "cancelled"}})
	b.send(msg{"type": "event", "id": "cancel", "source": "broker", "target": "svc.0",
		"correlation_id": wait["correlation_id"], "payload": map[string]any{"source": "client.9", "reason": "cancelled"}})
	b.send(msg{"type": "event", "id": "cancel", "source": "broker", "target": "svc.0",
		"correlation_id": uint64(999999), "payload": map[string]any{"source": "client.0", "reason": "cancelled"}})
	b.send(msg{"type": "event", "id": "cancel", "source": "broker", "target": "svc.0", "correlation_id": wait["correlation_id"]})
	select {
	case got := <-stopped:
		t.Fatalf("stopped by a cancel it should ignore: %+v", got)
	case <-time.After(300 * time.Millisecond):
	}
	if got := <-stopped; got.reason != "" || got.err != nil {
		t.Fatalf("%+v", got)
	}
	if reply := b.expect("Wait's reply"); reply.value(t) != "done" {
		t.Fatalf("%v", reply)
	}
	// A handler that ignores its cancel runs on; its reply is not sent.
	ignore := b.request("Ignore", nil)
	b.send(ignore)
	b.cancel(ignore, ReasonCancelled)
	time.Sleep(20 * time.Millisecond)
	close(ignoring)
	b.quiet(100 * time.Millisecond)
	b.call(b.request("Ping", nil))
}

// Two requesters may use the same correlation id: a cancel names one.
func TestCancelTellsRequestersApart(t *testing.T) {
	svc := NewService()
	svc.Handle("Wait", func(ctx context.Context, req *Request) (any, error) {
		select {
		case <-Cancelled(ctx):
			return "cancelled", nil
		case <-time.After(300 * time.Millisecond):
			return "slept", nil
		}
	})
	b := serve(t, svc, nil)
	for _, source := range []string{"client.0", "client.1", "client.2"} {
		b.send(msg{"type": "request", "id": "Wait", "correlation_id": uint64(7), "source": source, "target": "svc.0"})
	}
	time.Sleep(20 * time.Millisecond)
	b.send(msg{"type": "event", "id": "cancel", "source": "broker", "target": "svc.0",
		"correlation_id": uint64(7), "payload": map[string]any{"source": "client.1", "reason": "cancelled"}})
	got := map[string]any{}
	for i := 0; i < 2; i++ {
		reply := b.expect("a Wait's reply")
		got[reply.Target] = reply.value(t)
	}
	if got["client.0"] != "slept" || got["client.2"] != "slept" || len(got) != 2 {
		t.Fatalf("%v", got)
	}
}

func TestStreamingReplies(t *testing.T) {
	svc := NewService()
	sendErr := make(chan error, 1)
	svc.HandleStream("Count", func(ctx context.Context, req *Request, send func(any) error) (any, error) {
		var n int
		if err := req.Decode(&n); err != nil {
			return nil, err
		}
		for i := 0; i < n; i++ {
			if err := send(i); err != nil {
				sendErr <- err
				return nil, err
			}
			if n > 100 {
				time.Sleep(time.Millisecond)
			}
		}
		return n, nil
	})
	b := serve(t, svc, nil)
	count := b.request("Count", 5, "stream", true)
	b.send(count)
	for i := 0; i < 5; i++ {
		part := b.expect("a partial reply")
		if part.Type != "response" || !part.More || part.CorrelationID != count["correlation_id"] ||
			part.Target != "client.0" || part.ID != "Count" || part.value(t) != int8(i) {
			t.Fatalf("partial %d: %v", i, part)
		}
	}
	last := b.expect("the final reply")
	if last.More || last.has("more") || last.value(t) != int8(5) {
		t.Fatalf("%v", last)
	}
	// Without stream: the final reply only.
	if last := b.call(b.request("Count", 5)); last.More || last.value(t) != int8(5) {
		t.Fatalf("%v", last)
	}
	// Cut (cancel busy): send fails, nothing more comes.
	long := b.request("Count", 100000, "stream", true)
	b.send(long)
	for i := 0; i < 3; i++ {
		b.expect("a partial")
	}
	b.cancel(long, ReasonBusy)
	err := <-sendErr
	if !isCode(err, CodeCancelled) || !strings.Contains(err.Error(), "busy") {
		t.Fatalf("send after the cut: %v", err)
	}
	for f := b.recv(100 * time.Millisecond); f != nil; f = b.recv(100 * time.Millisecond) {
		if !f.More {
			t.Fatalf("a final reply after the cut: %v", f)
		}
	}
}

func TestCallsOut(t *testing.T) {
	svc := NewService()
	type result struct {
		reply Raw
		err   error
	}
	calls := make(chan func(context.Context, *Service) (Raw, error), 1)
	results := make(chan result, 1)
	b := serve(t, svc, func(ctx context.Context, s *Service) error {
		for call := range calls {
			reply, err := call(ctx, s)
			results <- result{reply, err}
		}
		return nil
	})
	t.Cleanup(func() { close(calls) })

	// A reply: its payload, byte for byte.
	calls <- func(ctx context.Context, s *Service) (Raw, error) {
		return s.Call(ctx, "store", "Get", "k", WithTimeout(1500*time.Millisecond), WithKey("user-1"))
	}
	out := b.expect("the call out")
	if out.Type != "request" || out.Target != "store" || out.ID != "Get" || out.TimeoutMs != 1500 ||
		out.Key != "user-1" || out.value(t) != "k" || out.has("stream") {
		t.Fatalf("%v (timeout %d, key %q)", out, out.TimeoutMs, out.Key)
	}
	b.send(msg{"type": "response", "id": "Get", "correlation_id": out.CorrelationID, "source": "store.0",
		"target": "svc.0", "payload": msgpack.RawMessage{0xcd, 0, 9}})
	if r := <-results; r.err != nil || !bytes.Equal(r.reply, []byte{0xcd, 0, 9}) {
		t.Fatalf("%+v", r)
	}

	// An error reply: a *CallError with its code, message and source.
	calls <- func(ctx context.Context, s *Service) (Raw, error) { return s.Call(ctx, "store", "Get", nil) }
	out = b.expect("the call out")
	if out.TimeoutMs != uint64(DefaultCallTimeout/time.Millisecond) || !bytes.Equal(out.payload, []byte{0xc0}) {
		t.Fatalf("%v timeout %d", out, out.TimeoutMs)
	}
	b.send(msg{"type": "error", "id": "Get", "correlation_id": out.CorrelationID, "source": "broker",
		"target": "svc.0", "code": "unavailable", "error": "no ready worker"})
	var ce *CallError
	if r := <-results; !errors.As(r.err, &ce) || ce.Code != CodeUnavailable || ce.Message != "no ready worker" || ce.Source != "broker" {
		t.Fatalf("%+v", r)
	}

	// The context's deadline, when sooner, is the call's.
	calls <- func(ctx context.Context, s *Service) (Raw, error) {
		ctx, cancel := context.WithTimeout(ctx, 700*time.Millisecond)
		defer cancel()
		return s.Call(ctx, "store", "Get", Raw(nil), WithTimeout(time.Hour))
	}
	out = b.expect("the call out")
	if out.TimeoutMs < 600 || out.TimeoutMs > 700 || out.has("payload") {
		t.Fatalf("%v timeout %d", out, out.TimeoutMs)
	}
	b.send(msg{"type": "response", "id": "Get", "correlation_id": out.CorrelationID, "source": "store.0", "target": "svc.0"})
	if r := <-results; r.err != nil || r.reply != nil {
		t.Fatalf("%+v", r)
	}

	// Cancelling the context cancels the call at the broker.
	calls <- func(ctx context.Context, s *Service) (Raw, error) {
		ctx, cancel := context.WithCancel(ctx)
		go func() { time.Sleep(50 * time.Millisecond); cancel() }()
		return s.Call(ctx, "slow", "Wait", nil)
	}
	out = b.expect("the call out")
	cancel := b.expect("the cancel")
	if cancel.Type != "event" || cancel.ID != "cancel" || cancel.Target != "broker" ||
		cancel.CorrelationID != out.CorrelationID || cancel.has("payload") {
		t.Fatalf("%v", cancel)
	}
	if r := <-results; !isCode(r.err, CodeCancelled) {
		t.Fatalf("%+v", r)
	}
	// The broker's answer to the cancelled call finds no call: dropped.
	b.send(msg{"type": "error", "id": "Wait", "correlation_id": out.CorrelationID, "source": "broker",
		"target": "svc.0", "code": "cancelled", "error": "cancelled"})

	// A key too long never leaves.
	calls <- func(ctx context.Context, s *Service) (Raw, error) {
		return s.Call(ctx, "store", "Get", nil, WithKey(strings.Repeat("k", 257)))
	}
	if r := <-results; !isCode(r.err, CodeBadRequest) {
		t.Fatalf("%+v", r)
	}
	// Nobody answers: the call gives up a grace after its deadline.
	calls <- func(ctx context.Context, s *Service) (Raw, error) {
		return s.Call(ctx, "void", "M", nil, WithTimeout(10*time.Millisecond))
	}
	b.expect("the call out")
	started := time.Now()
	if r := <-results; !isCode(r.err, CodeTimeout) || time.Since(started) < 900*time.Millisecond {
		t.Fatalf("%+v after %v", r, time.Since(started))
	}
	b.quiet(50 * time.Millisecond)

	// A call in flight at EOF fails at once.
	calls <- func(ctx context.Context, s *Service) (Raw, error) {
		return s.Call(context.Background(), "void", "M", nil)
	}
	b.expect("the call out")
	b.eof()
	if r := <-results; !isCode(r.err, CodeShuttingDown) {
		t.Fatalf("%+v", r)
	}
}

// 10 000 calls in flight from one client, answered out of order: each
// gets its own reply.
func TestTenThousandCallsInFlight(t *testing.T) {
	const n = 10000
	svc := NewService()
	errs := make(chan error, n)
	b := serve(t, svc, func(ctx context.Context, s *Service) error {
		for i := 0; i < n; i++ {
			go func(i int) {
				reply, err := s.Call(ctx, "echo", "Echo", i)
				if err == nil {
					var back int
					if err = reply.Decode(&back); err == nil && back != i*2 {
						err = fmt.Errorf("call %d got %d", i, back)
					}
				}
				errs <- err
			}(i)
		}
		return nil
	})
	var requests []*frame
	seen := map[uint64]bool{}
	for len(requests) < n {
		f := b.expect("a call out")
		if seen[f.CorrelationID] {
			t.Fatalf("correlation id %d twice", f.CorrelationID)
		}
		seen[f.CorrelationID] = true
		requests = append(requests, f)
	}
	rand.New(rand.NewSource(1)).Shuffle(n, func(i, j int) { requests[i], requests[j] = requests[j], requests[i] })
	var batch []byte
	for _, f := range requests {
		var i int
		if err := msgpack.Unmarshal(f.payload, &i); err != nil {
			t.Fatal(err)
		}
		batch = append(batch, encodeFrame(t, msg{"type": "response", "id": "Echo", "correlation_id": f.CorrelationID,
			"source": "echo.0", "target": "svc.0", "payload": i * 2})...)
	}
	b.write(batch)
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

func TestStreamsIn(t *testing.T) {
	svc := NewService()
	type step struct {
		part Raw
		more bool
		err  error
	}
	steps := make(chan step, 2000)
	var st atomic.Pointer[Stream]
	open := make(chan error, 1)
	next := make(chan context.Context)
	b := serve(t, svc, func(ctx context.Context, s *Service) error {
		stream, err := s.Stream(ctx, "counter", "Count", 3, WithKey("k"))
		st.Store(stream)
		open <- err
		for c := range next {
			part, more, err := stream.Next(c)
			steps <- step{part, more, err}
		}
		return nil
	})
	defer close(next)
	out := b.expect("the stream's request")
	if err := <-open; err != nil {
		t.Fatal(err)
	}
	if !out.Stream || out.Key != "k" || out.ID != "Count" {
		t.Fatalf("%v", out)
	}
	reply := func(more bool, payload any) {
		m := msg{"type": "response", "id": "Count", "correlation_id": out.CorrelationID, "source": "counter.0",
			"target": "svc.0", "payload": payload}
		if more {
			m["more"] = true
		}
		b.send(m)
	}
	reply(true, 0)
	reply(true, 1)
	reply(false, 2)
	for i, want := range []struct {
		v    int8
		more bool
	}{{0, true}, {1, true}, {2, false}} {
		next <- context.Background()
		s := <-steps
		var v int8
		if s.err != nil || s.more != want.more || s.part.Decode(&v) != nil || v != want.v {
			t.Fatalf("step %d: %+v", i, s)
		}
	}
	next <- context.Background()
	if s := <-steps; s.err != ErrStreamEnded {
		t.Fatalf("%+v", s)
	}
	// A partial reply to a call that asked for no stream is dropped.
	b.send(msg{"type": "response", "id": "Count", "correlation_id": out.CorrelationID, "source": "counter.0",
		"target": "svc.0", "more": true})
}

func TestAStreamCutWhenItsReaderFallsBehind(t *testing.T) {
	svc := NewService()
	streams := make(chan *Stream, 1)
	b := serve(t, svc, func(ctx context.Context, s *Service) error {
		st, err := s.Stream(ctx, "counter", "Count", nil)
		if err != nil {
			return err
		}
		streams <- st
		return nil
	})
	out := b.expect("the stream's request")
	st := <-streams
	var batch []byte
	for i := 0; i <= StreamBuffer; i++ {
		batch = append(batch, encodeFrame(t, msg{"type": "response", "id": "Count", "more": true,
			"correlation_id": out.CorrelationID, "source": "counter.0", "target": "svc.0", "payload": i})...)
	}
	b.write(batch)
	cancel := b.expect("the cancel of the cut stream")
	if cancel.ID != "cancel" || cancel.CorrelationID != out.CorrelationID {
		t.Fatalf("%v", cancel)
	}
	for i := 0; i < StreamBuffer; i++ {
		if _, more, err := st.Next(context.Background()); !more || err != nil {
			t.Fatalf("partial %d: %v %v", i, more, err)
		}
	}
	if _, more, err := st.Next(context.Background()); more || !isCode(err, CodeBusy) {
		t.Fatalf("%v %v", more, err)
	}
}

func TestAStreamCancelledByItsContext(t *testing.T) {
	svc := NewService()
	got := make(chan error, 1)
	b := serve(t, svc, func(ctx context.Context, s *Service) error {
		ctx, cancel := context.WithCancel(ctx)
		go func() { time.Sleep(50 * time.Millisecond); cancel() }()
		st, err := s.Stream(ctx, "counter", "Count", nil)
		if err != nil {
			return err
		}
		for {
			_, more, err := st.Next(context.Background())
			if !more {
				got <- err
				return nil
			}
		}
	})
	out := b.expect("the stream's request")
	b.send(msg{"type": "response", "id": "Count", "more": true, "correlation_id": out.CorrelationID,
		"source": "counter.0", "target": "svc.0", "payload": 0})
	cancel := b.expect("the cancel")
	if cancel.ID != "cancel" || cancel.CorrelationID != out.CorrelationID {
		t.Fatalf("%v", cancel)
	}
	if err := <-got; !isCode(err, CodeCancelled) {
		t.Fatalf("%v", err)
	}
}

func TestEventsBothWays(t *testing.T) {
	svc := NewService()
	notes := make(chan *Event, 1)
	svc.OnEvent("note", func(ctx context.Context, ev *Event) { notes <- ev })
	svc.OnEvent("boom", func(ctx context.Context, ev *Event) { panic("event boom") })
	svc.Handle("Notify", func(ctx context.Context, req *Request) (any, error) {
		var p []string
		if err := req.Decode(&p); err != nil {
			return nil, err
		}
		return nil, svc.Emit(p[0], p[1], "sent")
	})
	b := serve(t, svc, nil)
	b.send(msg{"type": "event", "id": "boom", "source": "client.3", "target": "svc.0"})
	b.send(msg{"type": "event", "id": "note", "source": "client.3", "target": "svc.0", "payload": map[string]any{"n": []int{1, 2}}})
	ev := <-notes
	var v map[string][]int
	if ev.Source != "client.3" || ev.Name != "note" || ev.Decode(&v) != nil || len(v["n"]) != 2 {
		t.Fatalf("%+v", ev)
	}
	b.send(b.request("Notify", []any{"client.3", "note"}))
	event := b.expect("the event")
	if event.Type != "event" || event.ID != "note" || event.Target != "client.3" || event.value(t) != "sent" {
		t.Fatalf("%v", event)
	}
	reply := b.expect("Notify's reply")
	if reply.Type != "response" || !bytes.Equal(reply.payload, []byte{0xc0}) {
		t.Fatalf("replies nil: %v", reply)
	}
	if !b.logged("event boom") {
		t.Fatalf("%s", b.logs)
	}
}

func TestCallBeforeRun(t *testing.T) {
	svc := NewService()
	if _, err := svc.Call(context.Background(), "x", "M", nil); !isCode(err, CodeUnavailable) {
		t.Fatal(err)
	}
	if err := svc.Emit("x", "e", nil); !isCode(err, CodeUnavailable) {
		t.Fatal(err)
	}
}

// An inline handler that watches its context (a deadline timer armed)
// never shares it with the next request: run with -race.
func TestInlineHandlersThatWatchTheirContext(t *testing.T) {
	svc := NewService()
	var watchers sync.WaitGroup
	svc.HandleInline("Peek", func(ctx context.Context, req *Request) (any, error) {
		done := ctx.Done()
		watchers.Add(1)
		go func() {
			defer watchers.Done()
			<-done // closed when the handler returns
			if ctx.Err() == nil {
				panic("done without an error")
			}
		}()
		select {
		case <-done:
			return "done", nil
		default:
		}
		_, ok := ctx.Deadline()
		return ok, nil
	})
	b := serve(t, svc, nil)
	defer watchers.Wait()
	var batch []byte
	const n = 2000
	for i := 0; i < n; i++ {
		timeout := 1 + i%3
		if i%2 == 0 {
			batch = append(batch, encodeFrame(t, b.request("Peek", nil))...)
		} else {
			batch = append(batch, encodeFrame(t, b.request("Peek", nil, "timeout_ms", timeout))...)
		}
	}
	b.write(batch)
	for i := 0; i < n; i++ {
		f := b.expect("a Peek reply")
		if v := f.value(t); v != true && v != false && v != "done" {
			t.Fatalf("%v", f)
		}
	}
}

// RunWith's main: its error is logged, and serving goes on after it.
func TestMainsErrorIsLoggedAndServingGoesOn(t *testing.T) {
	svc := echoService()
	b := serve(t, svc, func(ctx context.Context, s *Service) error {
		return errors.New("main gave up")
	})
	if reply := b.call(b.request("Echo", "after main")); reply.value(t) != "after main" {
		t.Fatalf("%v", reply)
	}
	deadline := time.Now().Add(2 * time.Second)
	for !b.logged("main: main gave up") {
		if time.Now().After(deadline) {
			t.Fatalf("not logged: %s", b.logs)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := svc.Serve(strings.NewReader(""), io.Discard, nil); err == nil {
		t.Fatal("a Service served twice")
	}
}
