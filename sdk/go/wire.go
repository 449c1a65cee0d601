package procbroker

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// The envelope is a MessagePack map with string keys. It is read and
// written here by hand, without reflection: a request costs one pass over
// its bytes, and a payload is never decoded, only delimited (it is carried
// byte for byte).

// Message kinds (the envelope's `type`).
const (
	kindNone uint8 = iota
	kindRequest
	kindResponse
	kindEvent
	kindError
	kindUnknown
)

// wireError is what is wrong with a frame's body.
type wireError struct{ msg string }

func (e *wireError) Error() string { return e.msg }

func wireErr(format string, args ...any) error {
	return &wireError{msg: fmt.Sprintf(format, args...)}
}

var errShort = &wireError{msg: "the value is cut short"}

// envelope is a decoded frame; its byte slices alias the frame's body.
type envelope struct {
	kind     uint8
	kindText []byte
	id       []byte
	hasID    bool
	cid      uint64
	hasCID   bool
	source   []byte
	target   []byte
	payload  []byte // the payload's MessagePack bytes; nil when absent
	errText  []byte
	code     []byte
	timeout  uint64
	hasTO    bool
	stream   bool
	more     bool
	key      []byte
	hasKey   bool
}

// Bits of envelope keys already seen (each key may appear once).
const (
	seenType = 1 << iota
	seenID
	seenCID
	seenSource
	seenTarget
	seenPayload
	seenError
	seenCode
	seenTimeout
	seenStream
	seenMore
	seenKey
)

// decodeEnvelope reads body into e. Fields it could read stay set even
// when it fails (so a request's correlation id can be salvaged for a
// `bad_request` reply); a field of the wrong type is reported after the
// whole map was read, a body that is not MessagePack at once.
func decodeEnvelope(body []byte, e *envelope) error {
	*e = envelope{}
	if len(body) == 0 {
		return wireErr("empty frame")
	}
	n, p, err := readMapLen(body, 0)
	if err != nil {
		return err
	}
	var seen uint32
	var fieldErr error
	field := func(err error) {
		if fieldErr == nil {
			fieldErr = err
		}
	}
	for i := 0; i < n; i++ {
		if p >= len(body) {
			return errShort
		}
		var key []byte
		if m := body[p]; m&0xe0 == 0xa0 {
			// A fixstr, as keys are.
			end := p + 1 + int(m&0x1f)
			if end > len(body) {
				return errShort
			}
			key, p = body[p+1:end], end
		} else if key, p, err = readStr(body, p); err != nil {
			if isTypeError(err) {
				return wireErr("an envelope key is not a str")
			}
			return err
		}
		start := p
		var bit uint32
		switch string(key) {
		case "type":
			bit = seenType
			var s []byte
			var ok bool
			s, ok, p, err = readOptStr(body, p)
			if err == nil && ok {
				e.kindText = s
				switch string(s) {
				case "request":
					e.kind = kindRequest
				case "response":
					e.kind = kindResponse
				case "event":
					e.kind = kindEvent
				case "error":
					e.kind = kindError
				default:
					e.kind = kindUnknown
				}
			}
		case "id":
			bit = seenID
			e.id, e.hasID, p, err = readOptStr(body, p)
		case "correlation_id":
			bit = seenCID
			e.cid, e.hasCID, p, err = readOptUint(body, p)
		case "source":
			bit = seenSource
			e.source, _, p, err = readOptStr(body, p)
		case "target":
			bit = seenTarget
			e.target, _, p, err = readOptStr(body, p)
		case "payload":
			bit = seenPayload
			p, err = skipValue(body, p)
			if err == nil {
				e.payload = body[start:p:p]
			}
		case "error":
			bit = seenError
			e.errText, _, p, err = readOptStr(body, p)
		case "code":
			bit = seenCode
			e.code, _, p, err = readOptStr(body, p)
		case "timeout_ms":
			bit = seenTimeout
			e.timeout, e.hasTO, p, err = readOptUint(body, p)
		case "stream":
			bit = seenStream
			e.stream, p, err = readOptBool(body, p)
		case "more":
			bit = seenMore
			e.more, p, err = readOptBool(body, p)
		case "key":
			// A key that is not a str is the broker's to refuse; a worker
			// has nothing to do with it, so it is skipped.
			bit = seenKey
			var ok bool
			e.key, ok, p, err = readOptStr(body, p)
			if isTypeError(err) {
				p, err = skipValue(body, start)
			} else {
				e.hasKey = ok
			}
		default:
			p, err = skipValue(body, p)
			if err != nil {
				return err
			}
			continue
		}
		if err != nil {
			if isTypeError(err) {
				field(wireErr("%q: %v", key, err))
				// Skip the value and read on.
				if p, err = skipValue(body, start); err != nil {
					return err
				}
			} else {
				return err
			}
		}
		if seen&bit != 0 {
			field(wireErr("key %q appears twice", key))
		}
		seen |= bit
	}
	if p != len(body) {
		return wireErr("%d bytes after the envelope", len(body)-p)
	}
	if fieldErr != nil {
		return fieldErr
	}
	switch e.kind {
	case kindNone:
		return wireErr("no \"type\"")
	case kindUnknown:
		return wireErr("unknown \"type\" %q", e.kindText)
	}
	if !e.hasID || len(e.id) == 0 {
		return wireErr("no \"id\"")
	}
	if !e.hasCID && e.kind != kindEvent {
		return wireErr("no \"correlation_id\"")
	}
	return nil
}

// typeError is a value of the wrong MessagePack type: the frame is still
// readable past it.
type typeError struct{ want, found string }

func (e *typeError) Error() string { return fmt.Sprintf("want %s, found %s", e.want, e.found) }

func wrongType(want string, marker byte) error {
	return &typeError{want: want, found: kindName(marker)}
}

func negative() error { return &typeError{want: "uint", found: "a negative int"} }

func isTypeError(err error) bool {
	var te *typeError
	return errors.As(err, &te)
}

// kindName names the MessagePack type a marker byte starts.
func kindName(m byte) string {
	switch {
	case m <= 0x7f, m >= 0xe0, m >= 0xcc && m <= 0xd3:
		return "int"
	case m >= 0x80 && m <= 0x8f, m == 0xde, m == 0xdf:
		return "map"
	case m >= 0x90 && m <= 0x9f, m == 0xdc, m == 0xdd:
		return "array"
	case m >= 0xa0 && m <= 0xbf, m == 0xd9, m == 0xda, m == 0xdb:
		return "str"
	case m == 0xc0:
		return "nil"
	case m == 0xc2, m == 0xc3:
		return "bool"
	case m == 0xc4, m == 0xc5, m == 0xc6:
		return "bin"
	case m == 0xca, m == 0xcb:
		return "float"
	case m == 0xc1:
		return "the never-used byte 0xc1"
	default:
		return "ext"
	}
}

func readMapLen(b []byte, p int) (int, int, error) {
	if p >= len(b) {
		return 0, p, errShort
	}
	m := b[p]
	switch {
	case m >= 0x80 && m <= 0x8f:
		return int(m & 0x0f), p + 1, nil
	case m == 0xde:
		if p+3 > len(b) {
			return 0, p, errShort
		}
		return int(binary.BigEndian.Uint16(b[p+1:])), p + 3, nil
	case m == 0xdf:
		if p+5 > len(b) {
			return 0, p, errShort
		}
		n := binary.BigEndian.Uint32(b[p+1:])
		if int64(n) > int64(len(b)-p) {
			return 0, p, errShort
		}
		return int(n), p + 5, nil
	}
	return 0, p, wireErr("the envelope is not a map but %s", kindName(m))
}

// readStr reads a str; a typeError for any other type.
func readStr(b []byte, p int) ([]byte, int, error) {
	if p >= len(b) {
		return nil, p, errShort
	}
	m := b[p]
	var n, h int
	switch {
	case m >= 0xa0 && m <= 0xbf:
		n, h = int(m&0x1f), 1
	case m == 0xd9:
		if p+2 > len(b) {
			return nil, p, errShort
		}
		n, h = int(b[p+1]), 2
	case m == 0xda:
		if p+3 > len(b) {
			return nil, p, errShort
		}
		n, h = int(binary.BigEndian.Uint16(b[p+1:])), 3
	case m == 0xdb:
		if p+5 > len(b) {
			return nil, p, errShort
		}
		u := binary.BigEndian.Uint32(b[p+1:])
		if int64(u) > int64(len(b)) {
			return nil, p, errShort
		}
		n, h = int(u), 5
	default:
		return nil, p, wrongType("str", m)
	}
	end := p + h + n
	if end > len(b) {
		return nil, p, errShort
	}
	return b[p+h : end : end], end, nil
}

// readOptStr reads a str, or nil (absent).
func readOptStr(b []byte, p int) ([]byte, bool, int, error) {
	if p < len(b) {
		if m := b[p]; m&0xe0 == 0xa0 {
			end := p + 1 + int(m&0x1f)
			if end <= len(b) {
				return b[p+1 : end : end], true, end, nil
			}
		} else if m == 0xc0 {
			return nil, false, p + 1, nil
		}
	}
	s, q, err := readStr(b, p)
	return s, err == nil, q, err
}

// readOptUint reads a non-negative integer in any int form, or nil.
func readOptUint(b []byte, p int) (uint64, bool, int, error) {
	if p >= len(b) {
		return 0, false, p, errShort
	}
	m := b[p]
	need := func(n int) bool { return p+1+n <= len(b) }
	switch {
	case m <= 0x7f:
		return uint64(m), true, p + 1, nil
	case m == 0xc0:
		return 0, false, p + 1, nil
	case m == 0xcc || m == 0xd0:
		if !need(1) {
			return 0, false, p, errShort
		}
		if m == 0xd0 && int8(b[p+1]) < 0 {
			return 0, false, p, negative()
		}
		return uint64(b[p+1]), true, p + 2, nil
	case m == 0xcd || m == 0xd1:
		if !need(2) {
			return 0, false, p, errShort
		}
		v := binary.BigEndian.Uint16(b[p+1:])
		if m == 0xd1 && int16(v) < 0 {
			return 0, false, p, negative()
		}
		return uint64(v), true, p + 3, nil
	case m == 0xce || m == 0xd2:
		if !need(4) {
			return 0, false, p, errShort
		}
		v := binary.BigEndian.Uint32(b[p+1:])
		if m == 0xd2 && int32(v) < 0 {
			return 0, false, p, negative()
		}
		return uint64(v), true, p + 5, nil
	case m == 0xcf || m == 0xd3:
		if !need(8) {
			return 0, false, p, errShort
		}
		v := binary.BigEndian.Uint64(b[p+1:])
		if m == 0xd3 && int64(v) < 0 {
			return 0, false, p, negative()
		}
		return v, true, p + 9, nil
	case m >= 0xe0:
		return 0, false, p, negative()
	}
	return 0, false, p, wrongType("uint", m)
}

// readOptBool reads a bool; nil is false.
func readOptBool(b []byte, p int) (bool, int, error) {
	if p >= len(b) {
		return false, p, errShort
	}
	switch b[p] {
	case 0xc0, 0xc2:
		return false, p + 1, nil
	case 0xc3:
		return true, p + 1, nil
	}
	return false, p, wrongType("bool", b[p])
}

// skipValue returns the end of the MessagePack value (with everything
// nested in it) that starts at p. Iterative: nesting costs no stack.
func skipValue(b []byte, p int) (int, error) {
	pending := 1 // values still to skip
	for pending > 0 {
		pending--
		if p >= len(b) {
			return p, errShort
		}
		m := b[p]
		var body, count int // bytes after the marker; nested values
		switch {
		case m <= 0x7f, m >= 0xe0, m == 0xc0, m == 0xc2, m == 0xc3:
			body = 0
		case m >= 0x80 && m <= 0x8f:
			count = 2 * int(m&0x0f)
		case m >= 0x90 && m <= 0x9f:
			count = int(m & 0x0f)
		case m >= 0xa0 && m <= 0xbf:
			body = int(m & 0x1f)
		case m == 0xcc, m == 0xd0:
			body = 1
		case m == 0xcd, m == 0xd1:
			body = 2
		case m == 0xce, m == 0xd2, m == 0xca:
			body = 4
		case m == 0xcf, m == 0xd3, m == 0xcb:
			body = 8
		case m == 0xd4:
			body = 2
		case m == 0xd5:
			body = 3
		case m == 0xd6:
			body = 5
		case m == 0xd7:
			body = 9
		case m == 0xd8:
			body = 17
		case m == 0xc4, m == 0xd9: // bin8, str8
			if p+2 > len(b) {
				return p, errShort
			}
			body = 1 + int(b[p+1])
		case m == 0xc5, m == 0xda:
			if p+3 > len(b) {
				return p, errShort
			}
			body = 2 + int(binary.BigEndian.Uint16(b[p+1:]))
		case m == 0xc6, m == 0xdb:
			if p+5 > len(b) {
				return p, errShort
			}
			body = 4 + int(binary.BigEndian.Uint32(b[p+1:]))
		case m == 0xc7: // ext8
			if p+2 > len(b) {
				return p, errShort
			}
			body = 2 + int(b[p+1])
		case m == 0xc8:
			if p+3 > len(b) {
				return p, errShort
			}
			body = 3 + int(binary.BigEndian.Uint16(b[p+1:]))
		case m == 0xc9:
			if p+5 > len(b) {
				return p, errShort
			}
			body = 5 + int(binary.BigEndian.Uint32(b[p+1:]))
		case m == 0xdc, m == 0xde:
			if p+3 > len(b) {
				return p, errShort
			}
			count = int(binary.BigEndian.Uint16(b[p+1:]))
			if m == 0xde {
				count *= 2
			}
			body = 2
		case m == 0xdd, m == 0xdf:
			if p+5 > len(b) {
				return p, errShort
			}
			count = int(binary.BigEndian.Uint32(b[p+1:]))
			if m == 0xdf {
				count *= 2
			}
			body = 4
		default: // 0xc1
			return p, wireErr("0xc1 is not MessagePack")
		}
		p += 1 + body
		if p > len(b) || p < 0 {
			return p, errShort
		}
		pending += count
		// Each value takes at least one byte: more than that is a lie.
		if pending > len(b)-p {
			return p, errShort
		}
	}
	return p, nil
}

// checkValue reports whether b holds exactly one MessagePack value.
func checkValue(b []byte) error {
	end, err := skipValue(b, 0)
	if err != nil {
		return err
	}
	if end != len(b) {
		return wireErr("%d bytes after the value", len(b)-end)
	}
	return nil
}

// Writing.

func appendMapHeader(b []byte, n int) []byte {
	if n < 16 {
		return append(b, 0x80|byte(n))
	}
	return append(b, 0xde, byte(n>>8), byte(n))
}

func appendStrHeader(b []byte, n int) []byte {
	switch {
	case n < 32:
		return append(b, 0xa0|byte(n))
	case n <= math.MaxUint8:
		return append(b, 0xd9, byte(n))
	case n <= math.MaxUint16:
		return append(b, 0xda, byte(n>>8), byte(n))
	}
	return append(b, 0xdb, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
}

func appendStr(b []byte, s string) []byte {
	return append(appendStrHeader(b, len(s)), s...)
}

func appendUint(b []byte, v uint64) []byte {
	switch {
	case v <= 0x7f:
		return append(b, byte(v))
	case v <= math.MaxUint8:
		return append(b, 0xcc, byte(v))
	case v <= math.MaxUint16:
		return append(b, 0xcd, byte(v>>8), byte(v))
	case v <= math.MaxUint32:
		return append(b, 0xce, byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
	return append(b, 0xcf, byte(v>>56), byte(v>>48), byte(v>>40), byte(v>>32),
		byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
}

// Encoded keys and values, written as they are.
var (
	keyType    = []byte("\xa4type")
	keyID      = []byte("\xa2id")
	keyCID     = []byte("\xaecorrelation_id")
	keyTarget  = []byte("\xa6target")
	keyPayload = []byte("\xa7payload")
	keyError   = []byte("\xa5error")
	keyCode    = []byte("\xa4code")
	keyTimeout = []byte("\xaatimeout_ms")
	keyStream  = []byte("\xa6stream\xc3")
	keyMore    = []byte("\xa4more\xc3")
	keyKey     = []byte("\xa3key")

	valRequest  = []byte("\xa7request")
	valResponse = []byte("\xa8response")
	valEvent    = []byte("\xa5event")
	valError    = []byte("\xa5error")
)

// frameStart reserves the length prefix of a frame.
func frameStart(b []byte) ([]byte, int) {
	return append(b, 0, 0, 0, 0), len(b)
}

// frameEnd fills in the length prefix of the frame at start and returns
// its body's length.
func frameEnd(b []byte, start int) int {
	n := len(b) - start - 4
	binary.BigEndian.PutUint32(b[start:], uint32(n))
	return n
}

// appendReply writes a `response` (a partial one with more) to a request.
// An empty payload is written as none.
func appendReply(b []byte, id, target string, cid uint64, payload []byte, more bool) []byte {
	n := 4
	if len(payload) > 0 {
		n++
	}
	if more {
		n++
	}
	b = appendMapHeader(b, n)
	b = append(append(b, keyType...), valResponse...)
	b = appendStr(append(b, keyID...), id)
	b = appendUint(append(b, keyCID...), cid)
	b = appendStr(append(b, keyTarget...), target)
	if more {
		b = append(b, keyMore...)
	}
	if len(payload) > 0 {
		b = append(append(b, keyPayload...), payload...)
	}
	return b
}

// appendErrorReply writes an `error` reply to a request.
func appendErrorReply(b []byte, id, target string, cid uint64, code, message string) []byte {
	b = appendMapHeader(b, 6)
	b = append(append(b, keyType...), valError...)
	b = appendStr(append(b, keyID...), id)
	b = appendUint(append(b, keyCID...), cid)
	b = appendStr(append(b, keyTarget...), target)
	b = appendStr(append(b, keyCode...), code)
	b = appendStr(append(b, keyError...), message)
	return b
}

// appendRequest writes a request. An empty payload is written as none.
func appendRequest(b []byte, target, method string, cid uint64, payload []byte,
	timeoutMs uint64, stream bool, key string, hasKey bool) []byte {
	n := 5
	if len(payload) > 0 {
		n++
	}
	if stream {
		n++
	}
	if hasKey {
		n++
	}
	b = appendMapHeader(b, n)
	b = append(append(b, keyType...), valRequest...)
	b = appendStr(append(b, keyID...), method)
	b = appendUint(append(b, keyCID...), cid)
	b = appendStr(append(b, keyTarget...), target)
	b = appendUint(append(b, keyTimeout...), timeoutMs)
	if stream {
		b = append(b, keyStream...)
	}
	if hasKey {
		b = appendStr(append(b, keyKey...), key)
	}
	if len(payload) > 0 {
		b = append(append(b, keyPayload...), payload...)
	}
	return b
}

// appendEvent writes an event; with hasCID, it carries a correlation id
// (a `cancel` of a call does). An empty payload is written as none.
func appendEvent(b []byte, target, name string, payload []byte, cid uint64, hasCID bool) []byte {
	n := 3
	if len(payload) > 0 {
		n++
	}
	if hasCID {
		n++
	}
	b = appendMapHeader(b, n)
	b = append(append(b, keyType...), valEvent...)
	b = appendStr(append(b, keyID...), name)
	b = appendStr(append(b, keyTarget...), target)
	if hasCID {
		b = appendUint(append(b, keyCID...), cid)
	}
	if len(payload) > 0 {
		b = append(append(b, keyPayload...), payload...)
	}
	return b
}
