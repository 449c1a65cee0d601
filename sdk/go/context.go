package procbroker

import (
	"context"
	"sync"
	"time"
)

// Reasons the broker gives in a `cancel` (CancelReason returns them; a
// reason not listed here may come from a newer broker and means "stop"
// all the same).
const (
	// ReasonTimeout: the request's deadline passed (its caller got timeout).
	ReasonTimeout = "timeout"
	// ReasonCancelled: its caller cancelled it.
	ReasonCancelled = "cancelled"
	// ReasonCallerExited: its caller's process exited or was stopped.
	ReasonCallerExited = "caller_exited"
	// ReasonBusy: its stream was cut, the caller did not keep up.
	ReasonBusy = "busy"
	// ReasonShuttingDown: the drain at shutdown expired, or stdin closed.
	ReasonShuttingDown = "shutting_down"
)

type ctxKey struct{}

// reqCtx is a request as its handler holds it: the Request, and the
// context.Context the handler gets. Its Done channel and deadline timer
// are made only when a handler asks for Done, so a handler that never
// waits costs neither.
type reqCtx struct {
	req         Request
	deadline    time.Time
	hasDeadline bool

	mu       sync.Mutex
	done     chan struct{}
	err      error
	reason   string
	brokerCh chan struct{} // closed when cancelled (made on demand)
	byBroker bool          // the broker cancelled it: its reply is not sent
	timer    *time.Timer
	finished bool // the handler returned: no more partial replies

	sameID *reqCtx // another running request with the same correlation id
	inline bool    // its handler runs on the reading goroutine
}

func (c *reqCtx) Deadline() (time.Time, bool) { return c.deadline, c.hasDeadline }

func (c *reqCtx) Done() <-chan struct{} {
	c.mu.Lock()
	if c.done == nil {
		c.done = make(chan struct{})
		if c.err == nil && c.hasDeadline {
			if left := time.Until(c.deadline); left > 0 {
				c.timer = time.AfterFunc(left, c.expire)
			} else {
				c.err = context.DeadlineExceeded
			}
		}
		if c.err != nil {
			close(c.done)
		}
	}
	d := c.done
	c.mu.Unlock()
	return d
}

func (c *reqCtx) Err() error {
	c.mu.Lock()
	if c.err == nil && c.hasDeadline && !time.Now().Before(c.deadline) {
		c.endLocked(context.DeadlineExceeded)
	}
	err := c.err
	c.mu.Unlock()
	return err
}

func (c *reqCtx) Value(key any) any {
	if _, ok := key.(ctxKey); ok {
		return c
	}
	return nil
}

func (c *reqCtx) String() string {
	return "procbroker.Request(" + c.req.Method + ")"
}

func (c *reqCtx) expire() {
	c.mu.Lock()
	c.endLocked(context.DeadlineExceeded)
	c.mu.Unlock()
}

// endLocked ends the context with err (the first end stays).
func (c *reqCtx) endLocked(err error) {
	if c.err != nil {
		return
	}
	c.err = err
	if c.done != nil {
		close(c.done)
	}
	if c.timer != nil {
		c.timer.Stop()
	}
}

// cancel cancels the request with reason (the first reason stays);
// byBroker when the broker's `cancel` said so (its reply is then not
// sent). Reason timeout ends the context with DeadlineExceeded, the
// others with Canceled.
func (c *reqCtx) cancel(reason string, byBroker bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reason != "" {
		return
	}
	c.reason = reason
	c.byBroker = c.byBroker || byBroker
	if c.brokerCh != nil {
		close(c.brokerCh)
	}
	if reason == ReasonTimeout {
		c.endLocked(context.DeadlineExceeded)
	} else {
		c.endLocked(context.Canceled)
	}
}

// finish marks the handler returned; its context ends (Canceled, unless it
// ended already), as net/http's does. Reports whether the broker
// cancelled the request.
func (c *reqCtx) finish() bool {
	c.mu.Lock()
	c.finished = true
	c.endLocked(context.Canceled)
	by := c.byBroker
	c.mu.Unlock()
	return by
}

func requestOf(ctx context.Context) *reqCtx {
	if ctx == nil {
		return nil
	}
	c, _ := ctx.Value(ctxKey{}).(*reqCtx)
	return c
}

// CancelReason returns why the request whose handler got ctx (or a
// context derived from it) was cancelled: the reason of the broker's
// `cancel` (ReasonTimeout, ReasonCancelled, ReasonCallerExited,
// ReasonBusy, ReasonShuttingDown, or a newer one), or ReasonShuttingDown
// once stdin closed. It is "" while nothing cancelled it, including when
// ctx is done only because its own deadline passed (ctx.Err() is then
// context.DeadlineExceeded, and the broker's `cancel` with reason
// "timeout" is on its way).
func CancelReason(ctx context.Context) string {
	c := requestOf(ctx)
	if c == nil {
		return ""
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reason
}

// Cancelled returns a channel that is closed when the request whose
// handler got ctx is cancelled (by the broker's `cancel`, or stdin
// closing), unlike ctx.Done(), which also closes at the request's own
// deadline and when the handler returns. It is nil (never ready) for a
// context that is not a handler's.
func Cancelled(ctx context.Context) <-chan struct{} {
	c := requestOf(ctx)
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.brokerCh == nil {
		c.brokerCh = make(chan struct{})
		if c.reason != "" {
			close(c.brokerCh)
		}
	}
	return c.brokerCh
}

// RequestFrom returns the request whose handler got ctx (or a context
// derived from it), or nil.
func RequestFrom(ctx context.Context) *Request {
	if c := requestOf(ctx); c != nil {
		return &c.req
	}
	return nil
}
