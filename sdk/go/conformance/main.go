// Command conformance is the Go SDK's conformance subject: a service that
// implements the methods a conformance kit calls to check an SDK (Echo,
// Sleep, Active, Count, Fail, Deadline, WhoAmI, Relay, Notify, LastCancel,
// LastNote, and the event note), written with the SDK alone. State is per
// process.
//
//	procbroker conformance -- go run ./conformance
package main

import (
	"context"
	"log"
	"os"
	"sync"
	"sync/atomic"
	"time"

	procbroker "github.com/procbroker/procbroker/sdk/go"
)

// state is what the subject remembers between requests.
type state struct {
	sleeping atomic.Int64

	mu         sync.Mutex
	lastCancel *lastCancel
	lastNote   procbroker.Raw
}

type lastCancel struct {
	CorrelationID uint64 `msgpack:"correlation_id"`
	Reason        string `msgpack:"reason"`
}

// noteCancel remembers the cancel of ctx's request, if the broker (or EOF)
// cancelled it.
func (st *state) noteCancel(ctx context.Context) {
	reason := procbroker.CancelReason(ctx)
	if reason == "" {
		return
	}
	st.mu.Lock()
	st.lastCancel = &lastCancel{CorrelationID: procbroker.RequestFrom(ctx).CorrelationID, Reason: reason}
	st.mu.Unlock()
}

func main() {
	svc := procbroker.NewService()
	st := &state{}

	svc.HandleInline("Echo", func(ctx context.Context, req *procbroker.Request) (any, error) {
		return req.Payload, nil
	})

	// Sleep waits until the broker's cancel (not its own deadline: the
	// broker's cancel is what LastCancel reports).
	svc.Handle("Sleep", func(ctx context.Context, req *procbroker.Request) (any, error) {
		var p struct {
			Ms uint64 `msgpack:"ms"`
		}
		if err := req.Decode(&p); err != nil {
			return nil, procbroker.Errorf(procbroker.CodeBadRequest, "%v", err)
		}
		st.sleeping.Add(1)
		defer st.sleeping.Add(-1)
		started := time.Now()
		timer := time.NewTimer(time.Duration(p.Ms) * time.Millisecond)
		defer timer.Stop()
		cancelled := false
		select {
		case <-timer.C:
		case <-procbroker.Cancelled(ctx):
			cancelled = true
			st.noteCancel(ctx)
		}
		return map[string]any{
			"slept_ms":  time.Since(started).Milliseconds(),
			"cancelled": cancelled,
		}, nil
	})

	svc.Handle("Active", func(ctx context.Context, req *procbroker.Request) (any, error) {
		return map[string]any{"sleeping": st.sleeping.Load()}, nil
	})

	svc.HandleStream("Count", func(ctx context.Context, req *procbroker.Request, send func(any) error) (any, error) {
		defer st.noteCancel(ctx)
		var p struct {
			N       uint64 `msgpack:"n"`
			DelayMs uint64 `msgpack:"delay_ms"`
		}
		if err := req.Decode(&p); err != nil {
			return nil, procbroker.Errorf(procbroker.CodeBadRequest, "%v", err)
		}
		for i := uint64(0); i < p.N; i++ {
			if i > 0 && p.DelayMs > 0 {
				t := time.NewTimer(time.Duration(p.DelayMs) * time.Millisecond)
				select {
				case <-t.C:
				case <-ctx.Done():
					t.Stop()
					return nil, ctx.Err()
				}
			}
			if err := send(i); err != nil {
				return nil, err
			}
		}
		return p.N, nil
	})

	svc.Handle("Fail", func(ctx context.Context, req *procbroker.Request) (any, error) {
		var p struct {
			Code    string `msgpack:"code"`
			Message string `msgpack:"message"`
		}
		if err := req.Decode(&p); err != nil {
			return nil, procbroker.Errorf(procbroker.CodeBadRequest, "%v", err)
		}
		if p.Code == "" {
			p.Code = procbroker.CodeHandler
		}
		return nil, &procbroker.CallError{Code: p.Code, Message: p.Message}
	})

	svc.Handle("Deadline", func(ctx context.Context, req *procbroker.Request) (any, error) {
		d, ok := ctx.Deadline()
		if !ok {
			return nil, nil
		}
		left := time.Until(d).Milliseconds()
		if left < 0 {
			left = 0
		}
		return left, nil
	})

	svc.Handle("WhoAmI", func(ctx context.Context, req *procbroker.Request) (any, error) {
		return map[string]any{"id": svc.ProcessID(), "pid": os.Getpid()}, nil
	})

	// Relay calls with what is left of its own deadline (ctx carries it);
	// cancelled, it gives up the call, which cancels it at the broker.
	svc.Handle("Relay", func(ctx context.Context, req *procbroker.Request) (any, error) {
		defer st.noteCancel(ctx)
		var p struct {
			Target string `msgpack:"target"`
			Method string `msgpack:"method"`
		}
		if err := req.Decode(&p); err != nil {
			return nil, procbroker.Errorf(procbroker.CodeBadRequest, "%v", err)
		}
		payload, err := req.Payload.Field("payload") // verbatim, none if absent
		if err != nil {
			return nil, err
		}
		reply, err := svc.Call(ctx, p.Target, p.Method, payload)
		if err != nil {
			return nil, err
		}
		return reply, nil
	})

	svc.Handle("Notify", func(ctx context.Context, req *procbroker.Request) (any, error) {
		var p struct {
			Target string `msgpack:"target"`
			Event  string `msgpack:"event"`
		}
		if err := req.Decode(&p); err != nil {
			return nil, procbroker.Errorf(procbroker.CodeBadRequest, "%v", err)
		}
		payload, err := req.Payload.Field("payload")
		if err != nil {
			return nil, err
		}
		if err := svc.Emit(p.Target, p.Event, payload); err != nil {
			return nil, err
		}
		return nil, nil
	})

	svc.Handle("LastCancel", func(ctx context.Context, req *procbroker.Request) (any, error) {
		st.mu.Lock()
		defer st.mu.Unlock()
		if st.lastCancel == nil {
			return nil, nil
		}
		return *st.lastCancel, nil
	})

	svc.Handle("LastNote", func(ctx context.Context, req *procbroker.Request) (any, error) {
		st.mu.Lock()
		defer st.mu.Unlock()
		if len(st.lastNote) == 0 {
			return nil, nil
		}
		return st.lastNote, nil
	})

	svc.OnEvent("note", func(ctx context.Context, ev *procbroker.Event) {
		st.mu.Lock()
		st.lastNote = ev.Payload
		st.mu.Unlock()
	})

	if err := svc.Run(); err != nil {
		log.Fatal(err)
	}
}
