package procbroker

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"time"
)

// outbox is stdout: frames are appended to one buffer under a lock, and
// one writer goroutine writes whatever has piled up in a single write.
// While it writes, the next batch piles up, so under load many replies
// share one system call.
type outbox struct {
	w        io.Writer
	maxFrame int

	mu       sync.Mutex
	buf      []byte // frames waiting for the writer
	spare    []byte // the other buffer, reused
	frames   int    // frames in buf
	inFlight int    // frames being written
	woken    bool   // the writer was signalled and has not taken buf yet
	closing  bool   // no new frames; the writer exits once buf is written
	err      error  // the write that failed (stdout is gone)
	lowWater []chan struct{}

	wake chan struct{}
	done chan struct{} // closed when the writer has exited
}

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
	if !o.woken {
		// Under the lock: close (which closes wake) cannot come between.
		o.woken = true
		select {
		case o.wake <- struct{}{}:
		default:
		}
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

func (o *outbox) run() {
	defer close(o.done)
	for range o.wake {
		// Let the handlers that are ready to run (those of the requests one
		// read brought) add their replies first: one write for all.
		runtime.Gosched()
		for {
			o.mu.Lock()
			out := o.buf
			if len(out) == 0 {
				o.woken = false
				closing := o.closing
				o.mu.Unlock()
				if closing {
					return
				}
				break
			}
			o.buf = o.spare[:0]
			o.inFlight, o.frames = o.frames, 0
			o.mu.Unlock()

			_, err := o.w.Write(out)

			o.mu.Lock()
			o.inFlight = 0
			if cap(out) <= 1<<20 {
				o.spare = out[:0]
			} else {
				o.spare = make([]byte, 0, 1<<16)
			}
			waiters := o.lowWater
			o.lowWater = nil
			if err != nil {
				o.err = err
				o.buf = nil
				o.frames = 0
			}
			o.mu.Unlock()
			for _, ch := range waiters {
				close(ch)
			}
			if err != nil {
				// Nobody reads stdout any more: drain the signals until close.
				for range o.wake {
				}
				return
			}
		}
	}
}

// close writes what is queued, then stops the writer; it waits at most
// `wait` for that.
func (o *outbox) close(wait time.Duration) {
	o.mu.Lock()
	if !o.closing {
		o.closing = true
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
