package procbroker

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"time"
)

// outbox is stdout: frames are appended to one buffer under a lock and
// written in batches, never two writes at once, in the order they were
// queued. Whatever is queued always has someone to write it: the one
// writing now (who looks again when done), the reading goroutine while it
// holds the outbox (it writes before it waits for input: the replies to
// what one read brought go out in one write), or the writer goroutine,
// woken for frames queued while the reader waits.
type outbox struct {
	w        io.Writer
	maxFrame int

	mu       sync.Mutex
	buf      []byte // frames waiting to be written
	spare    []byte // the other buffer, reused
	frames   int    // frames in buf
	inFlight int    // frames being written
	writing  bool   // a batch is being written
	held     bool   // the reader will write what is queued before it waits
	woken    bool   // the writer goroutine was signalled and has not run yet
	closing  bool   // no new frames; the writer exits once buf is written
	err      error  // the write that failed (stdout is gone)
	lowWater []chan struct{}

	wake chan struct{}
	done chan struct{} // closed when the writer has exited
}

// The reader writes a batch itself only below this size (a pipe takes it
// without blocking); a bigger one goes to the writer goroutine, so that
// reading never waits on a slow stdout.
const inlineWrite = 1 << 16

var errClosed = errors.New("stdout is closed")

func newOutbox(w io.Writer, maxFrame int) *outbox {
	o := &outbox{
		w:        w,
		maxFrame: maxFrame,
		buf:      make([]byte, 0, 1<<16),
		spare:    make([]byte, 0, 1<<16),
		wake:     make(chan struct{}, 1),
		done:     make(chan struct{}),
	}
	go o.run()
	return o
}

// begin locks the outbox and returns the buffer to append one frame to;
// commit (or abort) must follow. It fails when stdout is closed.
func (o *outbox) begin() ([]byte, int, error) {
	o.mu.Lock()
	if o.closing || o.err != nil {
		err := o.err
		o.mu.Unlock()
		if err == nil {
			err = errClosed
		}
		return nil, 0, err
	}
	b, start := frameStart(o.buf)
	return b, start, nil
}

// commit ends the frame begun at start, queues it for the writer and
// unlocks. A frame over the size limit is taken back and reported.
func (o *outbox) commit(b []byte, start int) error {
	if n := frameEnd(b, start); n > o.maxFrame {
		o.buf = b[:start]
		o.mu.Unlock()
		return &CallError{Code: CodeTooLarge,
			Message: fmt.Sprintf("a frame of %d bytes is over the limit of %d", n, o.maxFrame)}
	}
	o.buf = b
	o.frames++
	if !o.writing && !o.held {
		o.signalLocked()
	}
	o.mu.Unlock()
	return nil
}

// abort drops the frame begun and unlocks.
func (o *outbox) abort(start int) {
	o.buf = o.buf[:start]
	o.mu.Unlock()
}

// depth is how many frames wait to be written (queued or being written).
func (o *outbox) depth() int {
	o.mu.Lock()
	n := o.frames + o.inFlight
	o.mu.Unlock()
	return n
}

// belowWater returns a channel closed once fewer than n frames wait (or
// the outbox is closed), or nil if that is already so.
func (o *outbox) belowWater(n int) <-chan struct{} {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.frames+o.inFlight < n || o.closing || o.err != nil {
		return nil
	}
	ch := make(chan struct{})
	o.lowWater = append(o.lowWater, ch)
	return ch
}

// signalLocked wakes the writer goroutine (under the lock: close, which
// closes wake, cannot come between).
func (o *outbox) signalLocked() {
	if o.woken || o.closing {
		return
	}
	o.woken = true
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// hold says the reading goroutine is handling what one read brought: it
// will write the replies itself (release), the writer goroutine need not
// wake for them.
func (o *outbox) hold() {
	o.mu.Lock()
	o.held = true
	o.mu.Unlock()
}

// release is the reader about to wait for input: it writes what is queued
// (a small batch, unless a write is under way), or leaves it to the writer
// goroutine.
func (o *outbox) release() {
	o.mu.Lock()
	o.held = false
	if !o.writing && len(o.buf) > 0 {
		if len(o.buf) <= inlineWrite {
			o.writeLocked()
		} else {
			o.signalLocked()
		}
	}
	o.mu.Unlock()
}

// writeLocked writes what is queued, batch after batch, until nothing is
// (or stdout fails). Called with the lock held and nobody writing; returns
// with it held.
func (o *outbox) writeLocked() {
	for len(o.buf) > 0 && o.err == nil {
		out := o.buf
		o.buf = o.spare[:0]
		o.inFlight, o.frames = o.frames, 0
		o.writing = true
		o.mu.Unlock()

		_, err := o.w.Write(out)

		o.mu.Lock()
		o.writing = false
		o.inFlight = 0
		if cap(out) <= 1<<20 {
			o.spare = out[:0]
		} else {
			o.spare = make([]byte, 0, 1<<16)
		}
		for _, ch := range o.lowWater {
			close(ch)
		}
		o.lowWater = nil
		if err != nil {
			o.err = err
			o.buf = nil
			o.frames = 0
		}
	}
}

func (o *outbox) run() {
	defer close(o.done)
	for range o.wake {
		// Let the handlers that are ready to run (those of the requests one
		// read brought) add their replies first: one write for all.
		runtime.Gosched()
		o.mu.Lock()
		o.woken = false
		if !o.writing {
			o.writeLocked()
		}
		o.mu.Unlock()
	}
	// Closed: what is left, unless someone is writing it.
	o.mu.Lock()
	for o.writing {
		o.mu.Unlock()
		time.Sleep(time.Millisecond)
		o.mu.Lock()
	}
	o.writeLocked()
	o.mu.Unlock()
}

// close writes what is queued, then stops the writer; it waits at most
// `wait` for that.
func (o *outbox) close(wait time.Duration) {
	o.mu.Lock()
	if !o.closing {
		o.closing = true
		o.held = false
		close(o.wake)
	}
	o.mu.Unlock()
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-o.done:
	case <-t.C:
	}
}
