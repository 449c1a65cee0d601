package procbroker

import (
	"context"
	"io"
	"testing"
	"time"
)

// The cost of one request from its frame to its reply in the outbox,
// without the pipes (go test -bench . -benchmem).
func benchDispatch(b *testing.B, method string) {
	svc := echoService()
	svc.out.Store(newOutbox(io.Discard, DefaultMaxFrameBytes))
	svc.main, svc.stopMain = context.WithCancel(context.Background())
	svc.idle = make(chan struct{})
	body := pack(b, map[string]any{"type": "request", "id": method, "correlation_id": uint64(1 << 40),
		"source": "client.0", "target": "echo.0", "timeout_ms": 30000,
		"payload": map[string]any{"name": "test", "value": 123}})
	now := time.Now()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		svc.dispatch(body, now)
	}
}

func BenchmarkDispatchInline(b *testing.B) { benchDispatch(b, "EchoInline") }
func BenchmarkDispatch(b *testing.B)       { benchDispatch(b, "Echo") }

func BenchmarkDecodeEnvelope(b *testing.B) {
	body := pack(b, map[string]any{"type": "request", "id": "Echo", "correlation_id": uint64(1 << 40),
		"source": "client.0", "target": "echo.0", "timeout_ms": 30000,
		"payload": map[string]any{"name": "test", "value": 123}})
	var e envelope
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if err := decodeEnvelope(body, &e); err != nil {
			b.Fatal(err)
		}
	}
}
