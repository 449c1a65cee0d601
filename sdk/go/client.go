package procbroker

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// DefaultCallTimeout is a call's deadline when neither WithTimeout nor
// its context sets one (the broker's default too).
const DefaultCallTimeout = 30 * time.Second

// MaxKeyBytes is the longest routing key (WithKey).
const MaxKeyBytes = 256

// StreamBuffer is how many partial replies a Stream holds unread before
// the call is cut (cancelled, and ended with an error "busy"): read it as
// the replies come.
const StreamBuffer = 1000

// How much longer than its deadline a call waits for the broker's
// `timeout` reply before it gives up on its own, and how often calls past
// that are looked for.
const (
	callGrace  = time.Second
	sweepEvery = 250 * time.Millisecond
)

// ErrStreamEnded is returned by Stream.Next after the stream's final reply.
var ErrStreamEnded = errors.New("procbroker: the stream has ended")

// A CallOption sets something of a call: WithTimeout, WithKey.
type CallOption func(*callOptions)

type callOptions struct {
	timeout time.Duration
	key     string
	hasKey  bool
}

// WithTimeout sets the call's deadline, sent to the broker as timeout_ms:
// past it the call fails with code "timeout" (and the callee's handler is
// cancelled). A context deadline that comes sooner wins.
func WithTimeout(d time.Duration) CallOption {
	return func(o *callOptions) { o.timeout = d }
}

// WithKey sets the call's routing key (at most MaxKeyBytes bytes): calls to
// a service name with the same key reach the same worker while its set of
// ready workers is unchanged.
func WithKey(key string) CallOption {
	return func(o *callOptions) { o.key, o.hasKey = key, true }
}

// pendingCall is a call waiting for its reply: on ch (cap 1, one final
// reply), or on its stream.
type pendingCall struct {
	ch     chan callReply
	stream *Stream
	giveUp time.Time
	waited time.Duration
}

type callReply struct {
	payload Raw
	more    bool
	err     *CallError
}

func (pc *pendingCall) deliver(r callReply) {
	if pc.stream != nil {
		pc.stream.push(r)
		return
	}
	pc.ch <- r
}

// Call calls method of target (a service name: one of its workers; a
// process id; or "broker") with payload, and returns the reply's payload.
// The payload is encoded as a handler's result is (a Raw verbatim, an
// empty Raw as none, nil as MessagePack nil).
//
// A failed call returns a *CallError: the callee's error reply with its
// code, the broker's ("timeout", "unavailable", …), or one of the SDK's.
// Cancelling ctx cancels the request (the broker answers it and cancels
// the callee's handler) and returns a *CallError with code "cancelled"
// ("timeout" when ctx's deadline passed). The call's deadline is
// WithTimeout, or ctx's deadline when sooner, or DefaultCallTimeout; a
// handler that passes its own ctx gives the callee what is left of its
// budget.
func (s *Service) Call(ctx context.Context, target, method string, payload any, opts ...CallOption) (Raw, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	if err := ctx.Err(); err != nil {
		return nil, ctxCallError(err)
	}
	if err := notInline(ctx); err != nil {
		return nil, err
	}
	pc := &pendingCall{ch: make(chan callReply, 1)}
	cid, err := s.submit(ctx, pc, target, method, payload, false, opts)
	if err != nil {
		return nil, err
	}
	var r callReply
	select {
	case r = <-pc.ch:
	case <-ctx.Done():
		if s.abandon(cid) {
			return nil, ctxCallError(ctx.Err())
		}
		// The reply came meanwhile.
		r = <-pc.ch
	}
	if r.err != nil {
		return nil, r.err
	}
	return r.payload, nil
}

// notInline refuses a call from an inline handler: its reply could never
// be read (the handler holds the reading goroutine).
func notInline(ctx context.Context) error {
	if rc := requestOf(ctx); rc != nil && rc.inline {
		return &CallError{Code: CodeInternal,
			Message: "a handler registered with HandleInline cannot make calls (its reply would never be read): use Handle"}
	}
	return nil
}

func ctxCallError(err error) *CallError {
	if errors.Is(err, context.DeadlineExceeded) {
		return &CallError{Code: CodeTimeout, Message: "the call's context: " + err.Error()}
	}
	return &CallError{Code: CodeCancelled, Message: "the call's context: " + err.Error()}
}

// submit registers the call and queues its request; it returns the
// correlation id.
func (s *Service) submit(ctx context.Context, pc *pendingCall, target, method string,
	payload any, stream bool, opts []CallOption) (uint64, error) {
	var o callOptions
	for _, opt := range opts {
		opt(&o)
	}
	if o.hasKey && len(o.key) > MaxKeyBytes {
		return 0, &CallError{Code: CodeBadRequest,
			Message: fmt.Sprintf("a key of %d bytes is over the limit of %d", len(o.key), MaxKeyBytes)}
	}
	timeout := o.timeout
	if timeout <= 0 {
		timeout = DefaultCallTimeout
	}
	if d, ok := ctx.Deadline(); ok {
		if left := time.Until(d); left < timeout {
			timeout = left
		}
	}
	if timeout < time.Millisecond {
		timeout = time.Millisecond
	}
	timeoutMs := uint64((timeout + time.Millisecond - 1) / time.Millisecond)
	ob := s.out.Load()
	if ob == nil {
		return 0, &CallError{Code: CodeUnavailable, Message: "the service is not running"}
	}
	body, release, err := encodeValue(payload)
	if err != nil {
		return 0, err
	}
	defer release()

	s.cmu.Lock()
	if s.deaf || s.stopping.Load() {
		s.cmu.Unlock()
		return 0, &CallError{Code: CodeShuttingDown, Message: "the service is shutting down: no new calls"}
	}
	s.nextCID++
	cid := s.nextCID
	pc.waited = timeout + callGrace
	pc.giveUp = time.Now().Add(pc.waited)
	// Registered before the request goes out: its reply cannot come first.
	s.pending[cid] = pc
	sweep := !s.sweeping
	s.sweeping = true
	s.cmu.Unlock()
	if sweep {
		go s.sweep()
	}

	b, start, err := ob.begin()
	if err == nil {
		b = appendRequest(b, target, method, cid, body, timeoutMs, stream, o.key, o.hasKey)
		err = ob.commit(b, start)
	}
	if err != nil {
		s.cmu.Lock()
		delete(s.pending, cid)
		s.cmu.Unlock()
		var ce *CallError
		if errors.As(err, &ce) {
			return 0, ce
		}
		return 0, &CallError{Code: CodeShuttingDown, Message: err.Error()}
	}
	return cid, nil
}

// abandon forgets call cid; if it was still waiting for its reply, it tells
// the broker with `cancel` and reports true.
func (s *Service) abandon(cid uint64) bool {
	s.cmu.Lock()
	_, ok := s.pending[cid]
	delete(s.pending, cid)
	deaf := s.deaf
	s.cmu.Unlock()
	if ok && !deaf {
		s.sendCancel(cid)
	}
	return ok
}

func (s *Service) sendCancel(cid uint64) {
	ob := s.out.Load()
	b, start, err := ob.begin()
	if err != nil {
		return
	}
	b = appendEvent(b, "broker", "cancel", nil, cid, true)
	_ = ob.commit(b, start)
}

// complete hands a reply to the call it answers.
func (s *Service) complete(e *envelope) {
	partial := e.kind == kindResponse && e.more
	s.cmu.Lock()
	pc := s.pending[e.cid]
	if pc == nil || (partial && pc.stream == nil) {
		// Late (the call was cancelled or gave up), not ours, or a partial
		// reply to a call that asked for none.
		s.cmu.Unlock()
		return
	}
	if partial {
		r := callReply{payload: append(Raw(nil), e.payload...), more: true}
		if pc.stream.push(r) {
			s.cmu.Unlock()
			return
		}
		// The reader fell behind: cut the stream.
		delete(s.pending, e.cid)
		deaf := s.deaf
		s.cmu.Unlock()
		pc.stream.push(callReply{err: &CallError{Code: CodeBusy,
			Message: fmt.Sprintf("the stream's reader fell %d partial replies behind", StreamBuffer)}})
		if !deaf {
			s.sendCancel(e.cid)
		}
		return
	}
	delete(s.pending, e.cid)
	s.cmu.Unlock()
	var r callReply
	if e.kind == kindError {
		r.err = &CallError{Code: string(e.code), Message: string(e.errText), Source: string(e.source)}
		if r.err.Code == "" {
			r.err.Code = CodeInternal
		}
	} else if len(e.payload) > 0 {
		r.payload = append(Raw(nil), e.payload...)
	}
	pc.deliver(r)
}

// sweep fails the calls that got no reply by their deadline plus a grace
// (the broker's own `timeout` reply was lost). One goroutine for every
// call, while any is pending.
func (s *Service) sweep() {
	t := time.NewTicker(sweepEvery)
	defer t.Stop()
	for range t.C {
		now := time.Now()
		var late []*pendingCall
		s.cmu.Lock()
		for cid, pc := range s.pending {
			if !pc.giveUp.After(now) {
				late = append(late, pc)
				delete(s.pending, cid)
			}
		}
		done := len(s.pending) == 0
		if done {
			s.sweeping = false
		}
		s.cmu.Unlock()
		for _, pc := range late {
			pc.deliver(callReply{err: &CallError{Code: CodeTimeout,
				Message: fmt.Sprintf("no reply within %v", pc.waited)}})
		}
		if done {
			return
		}
	}
}

// failCalls fails every call in flight with err, and every call from now
// on (stdin is closed: no reply can come).
func (s *Service) failCalls(err *CallError) {
	s.cmu.Lock()
	s.deaf = true
	all := s.pending
	s.pending = map[uint64]*pendingCall{}
	s.cmu.Unlock()
	for _, pc := range all {
		pc.deliver(callReply{err: err})
	}
}

// Emit sends the event name to target (a process id; a service name: every
// worker of it; or "*": every process). The payload is encoded as a call's.
func (s *Service) Emit(target, name string, payload any) error {
	if s.out.Load() == nil {
		return &CallError{Code: CodeUnavailable, Message: "the service is not running"}
	}
	body, release, err := encodeValue(payload)
	if err != nil {
		return err
	}
	defer release()
	return s.emitRaw(target, name, body)
}

func (s *Service) emitRaw(target, name string, body []byte) error {
	ob := s.out.Load()
	b, start, err := ob.begin()
	if err != nil {
		return &CallError{Code: CodeShuttingDown, Message: err.Error()}
	}
	b = appendEvent(b, target, name, body, 0, false)
	return ob.commit(b, start)
}

// A Stream is a call that takes partial replies (see Service.Stream).
type Stream struct {
	s   *Service
	cid uint64

	mu     sync.Mutex
	queue  []callReply
	unread int // partial replies queued
	over   bool
	ended  bool // the final reply was read by Next
	wake   chan struct{}
	done   chan struct{} // closed once the final reply (or error) is queued
}

// Stream calls method of target asking for partial replies (stream =
// true). Read them with Next. The request is sent at once; cancelling ctx
// (or Close) before the final reply cancels it. A reader that falls
// StreamBuffer partial replies behind cuts the stream: it ends with an
// error "busy".
func (s *Service) Stream(ctx context.Context, target, method string, payload any, opts ...CallOption) (*Stream, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	if err := ctx.Err(); err != nil {
		return nil, ctxCallError(err)
	}
	if err := notInline(ctx); err != nil {
		return nil, err
	}
	st := &Stream{s: s, wake: make(chan struct{}, 1), done: make(chan struct{})}
	cid, err := s.submit(ctx, &pendingCall{stream: st}, target, method, payload, true, opts)
	if err != nil {
		return nil, err
	}
	st.cid = cid
	if ctx.Done() != nil {
		go func() {
			select {
			case <-ctx.Done():
				st.closeWith(ctxCallError(ctx.Err()))
			case <-st.done:
			}
		}()
	}
	return st, nil
}

// push queues a reply; false (and nothing queued) for a partial reply
// beyond StreamBuffer unread ones.
func (st *Stream) push(r callReply) bool {
	st.mu.Lock()
	if st.over {
		st.mu.Unlock()
		return true
	}
	if r.more {
		if st.unread >= StreamBuffer {
			st.mu.Unlock()
			return false
		}
		st.unread++
	} else {
		st.over = true
		close(st.done)
	}
	st.queue = append(st.queue, r)
	st.mu.Unlock()
	select {
	case st.wake <- struct{}{}:
	default:
	}
	return true
}

// Next returns the stream's next reply. With more true, part is a partial
// reply; with more false the stream has ended: part is the final reply's
// payload, or err its error (a *CallError). After that, Next returns
// ErrStreamEnded. Cancelling ctx while Next waits cancels the call.
func (st *Stream) Next(ctx context.Context) (part Raw, more bool, err error) {
	if ctx == nil {
		ctx = context.Background()
	}
	for {
		st.mu.Lock()
		if st.ended {
			st.mu.Unlock()
			return nil, false, ErrStreamEnded
		}
		if len(st.queue) > 0 {
			r := st.queue[0]
			st.queue[0] = callReply{}
			st.queue = st.queue[1:]
			if r.more {
				st.unread--
			} else {
				st.ended = true
			}
			st.mu.Unlock()
			if r.err != nil {
				return nil, false, r.err
			}
			return r.payload, r.more, nil
		}
		st.mu.Unlock()
		select {
		case <-st.wake:
		case <-ctx.Done():
			st.closeWith(ctxCallError(ctx.Err()))
			<-st.done // the final reply or the cancel's error is queued
		}
	}
}

// Close gives up the stream: before its final reply, that cancels the call
// (Next then returns a *CallError with code "cancelled"). Closing a
// finished stream does nothing.
func (st *Stream) Close() {
	st.closeWith(&CallError{Code: CodeCancelled, Message: "the stream was closed"})
}

func (st *Stream) closeWith(err *CallError) {
	if st.s.abandon(st.cid) {
		st.push(callReply{err: err})
	}
}
