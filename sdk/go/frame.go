package procbroker

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

// DefaultMaxFrameBytes is the largest frame read or written unless
// Service.MaxFrameBytes says otherwise: the broker's default
// max_frame_bytes (16 MiB).
const DefaultMaxFrameBytes = 16 << 20

// readChunk is how much one read asks for (more when a frame is bigger).
const readChunk = 1 << 16

// frameReader cuts a byte stream into frames: a 4-byte big-endian length,
// then that many bytes. It reads in big chunks, so one system call brings
// every frame the pipe holds.
type frameReader struct {
	r          io.Reader
	buf        []byte
	start, end int
	max        int
	readAt     time.Time // when the last read returned
}

// ErrOutOfSync is returned by Run (wrapped) when stdin stops being a
// stream of frames: a length over the limit, or EOF inside a frame.
var ErrOutOfSync = errors.New("stdin is out of sync")

func newFrameReader(r io.Reader, max int) *frameReader {
	return &frameReader{r: r, buf: make([]byte, readChunk), max: max}
}

// next returns the next frame's body, valid until the following call;
// io.EOF at a clean end, an error wrapping ErrOutOfSync otherwise.
func (f *frameReader) next() ([]byte, error) {
	for {
		avail := f.end - f.start
		need := 4
		if avail >= 4 {
			n := int(binary.BigEndian.Uint32(f.buf[f.start:]))
			if n > f.max {
				return nil, fmt.Errorf("%w: a frame of %d bytes is over the limit of %d", ErrOutOfSync, n, f.max)
			}
			if avail >= 4+n {
				body := f.buf[f.start+4 : f.start+4+n : f.start+4+n]
				f.start += 4 + n
				return body, nil
			}
			need = 4 + n
		}
		if f.start == f.end {
			f.start, f.end = 0, 0
			if len(f.buf) > 4*readChunk && need <= readChunk {
				// Give back a buffer grown for a big frame.
				f.buf = make([]byte, readChunk)
			}
		}
		if need > len(f.buf)-f.start {
			// Make room: move what is there to the front, in a bigger
			// buffer if the frame needs one.
			buf := f.buf
			if need > len(buf) {
				size := len(buf) * 2
				if size < need {
					size = need
				}
				buf = make([]byte, size)
			}
			copy(buf, f.buf[f.start:f.end])
			f.buf, f.start, f.end = buf, 0, avail
		} else if f.start > 0 && len(f.buf)-f.end < readChunk/4 && f.end-f.start < readChunk/4 {
			// Little room left at the end: move the little there is.
			copy(f.buf, f.buf[f.start:f.end])
			f.start, f.end = 0, avail
		}
		n, err := f.r.Read(f.buf[f.end:])
		f.end += n
		if n > 0 {
			// One clock reading for every frame this read brought: their
			// deadlines count from it.
			f.readAt = time.Now()
			continue
		}
		if err == nil {
			continue
		}
		if err == io.EOF {
			if f.end > f.start {
				return nil, fmt.Errorf("%w: EOF inside a frame (%d bytes of it read)", ErrOutOfSync, f.end-f.start)
			}
			return nil, io.EOF
		}
		return nil, err
	}
}

// buffered reports whether a whole frame is already read (no system call
// is needed for the next one).
func (f *frameReader) buffered() bool {
	avail := f.end - f.start
	if avail < 4 {
		return false
	}
	return avail >= 4+int(binary.BigEndian.Uint32(f.buf[f.start:]))
}
