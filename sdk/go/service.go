package procbroker

import (
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"log"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

// ProcessIDEnv names the environment variable in which the broker gives a
// process its id ("echo.2").
const ProcessIDEnv = "PROCBROKER_PROCESS_ID"

// After EOF on stdin, how long running handlers may take to write their
// replies before Run returns anyway.
const eofGrace = 100 * time.Millisecond

// How long Run waits for stdout to take what is queued when it returns.
const flushWait = time.Second

// A streaming handler's send waits once this many frames wait for stdout,
// until half of them are written.
const partialsHighWater = 1024

// A Request is a call to one of the service's methods.
type Request struct {
	// Source is the caller's process id ("broker" for health checks).
	Source string
	// CorrelationID is the caller's id for the request (unique among its
	// requests in flight; any uint64).
	CorrelationID uint64
	// Method is the method called.
	Method string
	// Payload is the request's payload as it came (nil when it had none).
	Payload Raw
	// Stream tells whether the caller asked for partial replies.
	Stream bool
	// Key is the request's routing key ("" when it had none).
	Key string
}

// Decode decodes the payload into v (a pointer); no payload decodes as nil.
func (r *Request) Decode(v any) error { return r.Payload.Decode(v) }

// An Event is an event delivered to the service.
type Event struct {
	// Source is the sender's process id.
	Source string
	// Name is the event's name (its envelope `id`).
	Name string
	// Payload is the event's payload as it came (nil when it had none).
	Payload Raw
}

// Decode decodes the payload into v (a pointer); no payload decodes as nil.
func (e *Event) Decode(v any) error { return e.Payload.Decode(v) }

// HandlerFunc serves a method. Its result is the reply's payload: a Raw
// is sent verbatim (an empty one as no payload), nil as MessagePack nil,
// anything else encoded with msgpack. A non-nil error replies an error
// instead: a *CallError (see Errorf) with its code, anything else with
// code "handler" and the error's text. A panic replies "internal".
//
// ctx carries the request's deadline (done at it) and is done when the
// broker cancels the request (see CancelReason) and when the handler
// returns.
type HandlerFunc func(ctx context.Context, req *Request) (any, error)

// StreamHandlerFunc serves a method with partial replies: each value given
// to send goes to the caller as a partial reply, in order, and the result
// is the final reply (as for HandlerFunc). A caller that did not ask for a
// stream gets the final reply only: send then drops the value. send fails
// once the request is cancelled or ctx is done (stop producing then); it
// waits while stdout is far behind.
type StreamHandlerFunc func(ctx context.Context, req *Request, send func(any) error) (any, error)

// EventHandlerFunc handles an event. Event handlers run one at a time, in
// the order the events came, on the goroutine that reads stdin: return
// quickly, and start a goroutine for long work. ctx is done at shutdown
// or EOF.
type EventHandlerFunc func(ctx context.Context, ev *Event)

type handler struct {
	name   string
	fn     HandlerFunc
	stream StreamHandlerFunc
	inline bool
}

// A Service serves methods and events over the broker's pipes (stdin and
// stdout), and calls other services through it. Register handlers, then
// Run. Handlers run concurrently, each request on its own goroutine.
type Service struct {
	// MaxFrameBytes is the largest frame read or written (the broker's
	// max_frame_bytes; DefaultMaxFrameBytes unless set before Run).
	MaxFrameBytes int
	// Logger receives what the service has to say (bad frames, handler
	// panics, main's error). It writes to stderr unless set before Run:
	// stdout carries frames only.
	Logger *log.Logger

	id       string
	handlers map[string]*handler
	events   map[string]EventHandlerFunc
	started  int32

	out      atomic.Pointer[outbox]
	main     context.Context
	stopMain context.CancelFunc

	// Requests being handled.
	rmu      sync.Mutex
	running  map[uint64]*reqCtx // by correlation id; same id, other source: chained
	active   int
	draining bool
	idle     chan struct{} // closed once draining and nothing runs
	idleShut bool

	// Calls in flight.
	cmu      sync.Mutex
	pending  map[uint64]*pendingCall
	nextCID  uint64
	deaf     bool // stdin closed: no reply can come
	sweeping bool

	// Strings the reading goroutine has seen (process ids), to share.
	interned map[string]string
	// The request that inline handlers get, reused.
	inlineRC *reqCtx
	// The broker said shutdown: no new requests, no new calls.
	stopping atomic.Bool
}

// NewService returns a service with no methods (but Ping) and no event
// handlers; its process id comes from PROCBROKER_PROCESS_ID.
func NewService() *Service {
	return &Service{
		MaxFrameBytes: DefaultMaxFrameBytes,
		Logger:        log.New(os.Stderr, "procbroker: ", 0),
		id:            os.Getenv(ProcessIDEnv),
		handlers:      map[string]*handler{},
		events:        map[string]EventHandlerFunc{},
		running:       map[uint64]*reqCtx{},
		pending:       map[uint64]*pendingCall{},
		interned:      map[string]string{},
	}
}

// ProcessID returns this process's id ("echo.2"), from
// PROCBROKER_PROCESS_ID ("" when run outside the broker).
func (s *Service) ProcessID() string { return s.id }

// Handle serves method with h (replacing any handler of that method).
// Ping is answered with {} unless a handler serves it. Register before Run.
func (s *Service) Handle(method string, h HandlerFunc) {
	s.handlers[method] = &handler{name: method, fn: h}
}

// HandleInline serves method with h run on the goroutine that reads
// stdin, one request at a time, instead of a goroutine of its own: for
// handlers that answer at once without blocking (an echo, a lookup in
// memory), whose cost per request it cuts by more than half. A handler
// that waits there (on a lock, a timer, a channel) stalls every request
// behind it; it cannot make calls (Call and Stream fail at once), and a
// cancel cannot reach it while it runs.
//
// req, and the bytes of req.Payload, are the handler's only until it
// returns (the service reuses them, as it does the buffer the payload was
// read into): copy what you keep. Returning req.Payload is fine: the reply
// is written before the bytes are reused. The same holds for ctx, unless
// the handler took ctx.Done() (or Cancelled(ctx)) while it ran: that ctx
// stays its own. Register before Run.
func (s *Service) HandleInline(method string, h HandlerFunc) {
	s.handlers[method] = &handler{name: method, fn: h, inline: true}
}

// HandleStream serves method with a streaming handler (see
// StreamHandlerFunc). Register before Run.
func (s *Service) HandleStream(method string, h StreamHandlerFunc) {
	s.handlers[method] = &handler{name: method, stream: h}
}

// OnEvent handles the events named name (see EventHandlerFunc); events
// without a handler are ignored. `shutdown` and `cancel` from the broker
// are the service's own and never reach a handler. Register before Run.
func (s *Service) OnEvent(name string, h EventHandlerFunc) {
	s.events[name] = h
}

// Run serves on stdin and stdout until EOF on stdin (or, after the broker's
// `shutdown`, until every request in flight is answered). It announces
// `ready` first. It returns nil at a clean end, and an error wrapping
// ErrOutOfSync when stdin stops being a stream of frames.
//
// Anything else the process writes to its stdout (a stray fmt.Println)
// goes to stderr while Run runs: stdout carries frames only.
func (s *Service) Run() error { return s.RunWith(nil) }

// RunWith is Run that also calls main on a goroutine of its own once the
// service is ready (to make calls, emit events, start work). Serving goes
// on after main returns (an error it returns is logged), until EOF; main's
// ctx is done at `shutdown` or EOF.
func (s *Service) RunWith(main func(ctx context.Context, s *Service) error) error {
	in, out, restore, err := stdio()
	if err != nil {
		return err
	}
	defer restore()
	return s.Serve(in, out, main)
}

// Serve is RunWith over any pair of streams: frames are read from in and
// written to out.
func (s *Service) Serve(in io.Reader, out io.Writer, main func(ctx context.Context, s *Service) error) error {
	if !atomic.CompareAndSwapInt32(&s.started, 0, 1) {
		return fmt.Errorf("procbroker: a Service runs once")
	}
	if s.MaxFrameBytes <= 0 {
		s.MaxFrameBytes = DefaultMaxFrameBytes
	}
	s.main, s.stopMain = context.WithCancel(context.Background())
	defer s.stopMain()
	s.idle = make(chan struct{})
	ob := newOutbox(out, s.MaxFrameBytes)
	s.out.Store(ob)
	if err := s.emitRaw("broker", "ready", nil); err != nil {
		ob.close(flushWait)
		return fmt.Errorf("procbroker: cannot announce ready: %w", err)
	}
	read := make(chan error, 1)
	go func() { read <- s.readLoop(in) }()
	if main != nil {
		go func() {
			if err := main(s.main, s); err != nil {
				s.logf("main: %v", err)
			}
		}()
	}
	var err error
	select {
	case err = <-read:
		// EOF means "exit now": handlers get a moment to reply; their calls
		// fail at once (no reply can come), and those that watch their
		// context are cancelled. The rest are left behind.
		s.stopMain()
		s.failCalls(&CallError{Code: CodeShuttingDown, Message: "stdin closed: no reply can come"})
		s.cancelAll(ReasonShuttingDown)
		t := time.NewTimer(eofGrace)
		select {
		case <-s.waitIdle():
		case <-t.C:
		}
		t.Stop()
	case <-s.idle:
		// Drained after `shutdown`.
	}
	ob.close(flushWait)
	if err != nil {
		s.logf("%v", err)
	}
	return err
}

// readLoop reads and dispatches frames until EOF or an error.
func (s *Service) readLoop(in io.Reader) error {
	frames := newFrameReader(in, s.MaxFrameBytes)
	ob := s.out.Load()
	defer ob.release()
	for {
		wait := !frames.buffered()
		if wait {
			// About to wait for input: the replies so far go out now.
			ob.release()
		}
		body, err := frames.next()
		if wait {
			ob.hold()
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		s.dispatch(body, frames.readAt)
	}
}

// dispatch handles one frame, read at received.
func (s *Service) dispatch(body []byte, received time.Time) {
	var e envelope
	if err := decodeEnvelope(body, &e); err != nil {
		s.badFrame(&e, body, err)
		return
	}
	switch e.kind {
	case kindRequest:
		s.onRequest(&e, received)
	case kindResponse, kindError:
		s.complete(&e)
	case kindEvent:
		s.onEvent(&e)
	}
}

// badFrame answers a frame that is not a valid envelope with bad_request
// when it is recognisably a request with a correlation id, and logs it.
func (s *Service) badFrame(e *envelope, body []byte, err error) {
	shown := body
	if len(shown) > 32 {
		shown = shown[:32]
	}
	s.logf("invalid frame skipped (%v): %s", err, hex.EncodeToString(shown))
	if e.kind == kindRequest && e.hasCID {
		id := string(e.id)
		if id == "" {
			id = "?"
		}
		s.replyError(id, string(e.source), e.cid, CodeBadRequest, "invalid request: "+err.Error())
	}
}

func (s *Service) intern(b []byte) string {
	if v, ok := s.interned[string(b)]; ok {
		return v
	}
	v := string(b)
	if len(s.interned) < 4096 {
		s.interned[v] = v
	}
	return v
}

func (s *Service) onRequest(e *envelope, received time.Time) {
	h := s.handlers[string(e.id)]
	if h == nil {
		if string(e.id) == "Ping" {
			s.reply("Ping", s.intern(e.source), e.cid, emptyMap)
			return
		}
		s.replyError(string(e.id), string(e.source), e.cid, CodeUnknownMethod,
			fmt.Sprintf("no method %q", e.id))
		return
	}
	if h.inline {
		s.serveInline(h, e, received)
		return
	}
	rc := &reqCtx{req: Request{
		Source:        s.intern(e.source),
		CorrelationID: e.cid,
		Method:        h.name,
		Stream:        e.stream,
	}}
	if len(e.payload) > 0 {
		rc.req.Payload = append(Raw(nil), e.payload...)
	}
	if e.hasKey {
		rc.req.Key = string(e.key)
	}
	rc.setDeadline(e, received)
	s.rmu.Lock()
	if s.draining {
		s.rmu.Unlock()
		s.replyError(h.name, rc.req.Source, e.cid, CodeShuttingDown, "the service is shutting down")
		return
	}
	if other := s.running[e.cid]; other != nil {
		rc.sameID = other
	}
	s.running[e.cid] = rc
	s.active++
	s.rmu.Unlock()
	go s.serveRequest(rc, h)
}

// setDeadline gives rc the deadline of e, received at received.
func (c *reqCtx) setDeadline(e *envelope, received time.Time) {
	if e.hasTO && e.timeout <= uint64(1<<62)/uint64(time.Millisecond) {
		c.hasDeadline = true
		c.deadline = received.Add(time.Duration(e.timeout) * time.Millisecond)
	}
}

// serveInline runs an inline handler and sends its reply. Its request
// (and context) is one the reading goroutine reuses, and its payload the
// frame's own bytes: both are the handler's until it returns.
func (s *Service) serveInline(h *handler, e *envelope, received time.Time) {
	if s.stopping.Load() {
		s.replyError(h.name, string(e.source), e.cid, CodeShuttingDown, "the service is shutting down")
		return
	}
	rc := s.inlineRC
	if rc == nil {
		rc = new(reqCtx)
		s.inlineRC = rc
	} else {
		*rc = reqCtx{}
	}
	rc.inline = true
	rc.req = Request{
		Source:        s.intern(e.source),
		CorrelationID: e.cid,
		Method:        h.name,
		Stream:        e.stream,
		Payload:       e.payload,
	}
	if e.hasKey {
		rc.req.Key = string(e.key)
	}
	rc.setDeadline(e, received)
	payload, release, code, message := s.runHandler(rc, h)
	rc.finish()
	s.sendReply(&rc.req, payload, code, message)
	release()
	if rc.done != nil || rc.brokerCh != nil {
		// The handler watched its context: a timer or a waiter may still
		// hold this one. The next request gets another.
		s.inlineRC = nil
	}
}

// sendReply sends the reply to req: payload, or the error code and message.
func (s *Service) sendReply(req *Request, payload []byte, code, message string) {
	if code != "" {
		s.replyError(req.Method, req.Source, req.CorrelationID, code, message)
	} else if err := s.reply(req.Method, req.Source, req.CorrelationID, payload); err != nil {
		code, message := replyError(err)
		s.replyError(req.Method, req.Source, req.CorrelationID, code, message)
	}
}

// unregisterLocked forgets rc among the running requests.
func (s *Service) unregisterLocked(rc *reqCtx) {
	cid := rc.req.CorrelationID
	head := s.running[cid]
	if head == rc {
		if rc.sameID == nil {
			delete(s.running, cid)
		} else {
			s.running[cid] = rc.sameID
		}
		return
	}
	for c := head; c != nil; c = c.sameID {
		if c.sameID == rc {
			c.sameID = rc.sameID
			return
		}
	}
}

// lookupLocked finds the running request (source, cid).
func (s *Service) lookupLocked(source []byte, cid uint64) *reqCtx {
	for c := s.running[cid]; c != nil; c = c.sameID {
		if c.req.Source == string(source) {
			return c
		}
	}
	return nil
}

var emptyMap = []byte{0x80}

// sameBytes reports whether a and b are the same bytes in memory.
func sameBytes(a, b []byte) bool {
	return len(a) > 0 && len(a) == len(b) && &a[0] == &b[0]
}

// serveRequest runs a request's handler and sends its reply.
func (s *Service) serveRequest(rc *reqCtx, h *handler) {
	payload, release, code, message := s.runHandler(rc, h)
	byBroker := rc.finish()
	s.rmu.Lock()
	s.unregisterLocked(rc)
	// A request the broker cancelled has been answered: its reply would be
	// dropped.
	if !byBroker {
		s.sendReply(&rc.req, payload, code, message)
	}
	s.active--
	if s.active == 0 && s.draining && !s.idleShut {
		s.idleShut = true
		close(s.idle)
	}
	s.rmu.Unlock()
	release()
}

// runHandler calls the handler and encodes its result: the payload, or
// the code and message of the error reply.
func (s *Service) runHandler(rc *reqCtx, h *handler) (payload []byte, release func(), code, message string) {
	release = noRelease
	defer func() {
		if p := recover(); p != nil {
			s.logf("the handler of %s panicked: %v\n%s", h.name, p, debug.Stack())
			payload, release, code, message = nil, noRelease, CodeInternal, fmt.Sprintf("the handler panicked: %v", p)
		}
	}()
	var result any
	var err error
	if h.fn != nil {
		result, err = h.fn(rc, &rc.req)
	} else {
		result, err = h.stream(rc, &rc.req, func(v any) error { return s.sendPartial(rc, v) })
	}
	if err != nil {
		code, message = replyError(err)
		return nil, noRelease, code, message
	}
	if r, ok := result.(Raw); ok && sameBytes(r, rc.req.Payload) {
		// The request's own payload (an echo): known to be one value.
		return r, noRelease, "", ""
	}
	payload, release, err = encodeValue(result)
	if err != nil {
		code, message = replyError(err)
		return nil, noRelease, code, message
	}
	return payload, release, "", ""
}

// sendPartial sends v as a partial reply to rc's request, if its caller
// asked for a stream.
func (s *Service) sendPartial(rc *reqCtx, v any) error {
	rc.mu.Lock()
	if rc.finished {
		rc.mu.Unlock()
		return &CallError{Code: CodeInternal, Message: "the final reply was already sent"}
	}
	if rc.reason != "" {
		reason := rc.reason
		rc.mu.Unlock()
		return &CallError{Code: CodeCancelled, Message: "the request was cancelled: " + reason}
	}
	if rc.err == nil && rc.hasDeadline && !time.Now().Before(rc.deadline) {
		rc.endLocked(context.DeadlineExceeded)
	}
	if rc.err != nil {
		err := rc.err
		rc.mu.Unlock()
		code, message := replyError(err)
		return &CallError{Code: code, Message: message}
	}
	if !rc.req.Stream {
		rc.mu.Unlock()
		return nil
	}
	payload, release, err := encodeValue(v)
	if err != nil {
		rc.mu.Unlock()
		return err
	}
	// Under rc.mu: the final reply cannot overtake this partial.
	err = s.reply1(rc.req.Method, rc.req.Source, rc.req.CorrelationID, payload, true)
	rc.mu.Unlock()
	release()
	if err != nil {
		return err
	}
	ob := s.out.Load()
	if ob.depth() >= partialsHighWater {
		if ch := ob.belowWater(partialsHighWater / 2); ch != nil {
			select {
			case <-ch:
			case <-rc.Done():
				return rc.Err()
			}
		}
	}
	return nil
}

func (s *Service) reply(id, target string, cid uint64, payload []byte) error {
	return s.reply1(id, target, cid, payload, false)
}

func (s *Service) reply1(id, target string, cid uint64, payload []byte, more bool) error {
	ob := s.out.Load()
	b, start, err := ob.begin()
	if err != nil {
		return err
	}
	b = appendReply(b, id, target, cid, payload, more)
	return ob.commit(b, start)
}

func (s *Service) replyError(id, target string, cid uint64, code, message string) {
	ob := s.out.Load()
	b, start, err := ob.begin()
	if err != nil {
		return
	}
	if len(message) > 1<<16 {
		message = message[:1<<16]
	}
	b = appendErrorReply(b, id, target, cid, code, message)
	_ = ob.commit(b, start)
}

func (s *Service) onEvent(e *envelope) {
	fromBroker := string(e.source) == "broker"
	switch string(e.id) {
	case "shutdown":
		if fromBroker {
			s.drain()
		} else {
			s.logf("shutdown from %q ignored (only the broker's counts)", e.source)
		}
		return
	case "cancel":
		if fromBroker {
			s.onCancel(e)
		}
		return
	}
	h := s.events[string(e.id)]
	if h == nil {
		return
	}
	ev := &Event{Source: s.intern(e.source), Name: string(e.id)}
	if len(e.payload) > 0 {
		ev.Payload = append(Raw(nil), e.payload...)
	}
	defer func() {
		if p := recover(); p != nil {
			s.logf("the handler of event %s panicked: %v\n%s", ev.Name, p, debug.Stack())
		}
	}()
	h(s.main, ev)
}

// onCancel cancels the running request a `cancel` from the broker names:
// its correlation id, and the payload's source (the requester).
func (s *Service) onCancel(e *envelope) {
	source, reason, err := cancelNotice(e.payload)
	if err != nil || !e.hasCID {
		s.logf("cancel ignored: %v", err)
		return
	}
	s.rmu.Lock()
	rc := s.lookupLocked(source, e.cid)
	s.rmu.Unlock()
	if rc != nil {
		rc.cancel(reason, true)
	}
}

// cancelNotice reads a `cancel`'s payload {source, reason}.
func cancelNotice(payload []byte) (source []byte, reason string, err error) {
	if len(payload) == 0 {
		return nil, "", wireErr("no payload")
	}
	n, p, err := readMapLen(payload, 0)
	if err != nil {
		return nil, "", err
	}
	var why []byte
	for i := 0; i < n; i++ {
		var k, v []byte
		if k, p, err = readStr(payload, p); err != nil {
			return nil, "", err
		}
		switch string(k) {
		case "source":
			v, p, err = readStr(payload, p)
			source = v
		case "reason":
			v, p, err = readStr(payload, p)
			why = v
		default:
			p, err = skipValue(payload, p)
		}
		if err != nil {
			return nil, "", err
		}
	}
	if source == nil || len(why) == 0 {
		return nil, "", wireErr("the payload lacks source or reason")
	}
	return source, string(why), nil
}

// drain is the broker's `shutdown`: no new calls, no new requests; Serve
// returns once those running are answered.
func (s *Service) drain() {
	s.stopping.Store(true)
	s.rmu.Lock()
	s.draining = true
	if s.active == 0 && !s.idleShut {
		s.idleShut = true
		close(s.idle)
	}
	s.rmu.Unlock()
	s.stopMain()
}

// cancelAll cancels every running request (their replies still go out).
func (s *Service) cancelAll(reason string) {
	s.rmu.Lock()
	all := make([]*reqCtx, 0, len(s.running))
	for _, head := range s.running {
		for rc := head; rc != nil; rc = rc.sameID {
			all = append(all, rc)
		}
	}
	s.rmu.Unlock()
	for _, rc := range all {
		rc.cancel(reason, false)
	}
}

// waitIdle returns a channel closed once no handler runs.
func (s *Service) waitIdle() <-chan struct{} {
	s.rmu.Lock()
	s.draining = true
	if s.active == 0 && !s.idleShut {
		s.idleShut = true
		close(s.idle)
	}
	s.rmu.Unlock()
	return s.idle
}

func (s *Service) logf(format string, args ...any) {
	if s.Logger != nil {
		s.Logger.Printf(format, args...)
	}
}
