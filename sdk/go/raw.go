package procbroker

import (
	"bytes"
	"sync"

	"github.com/vmihailenco/msgpack/v5"
)

// Raw is one MessagePack value, as bytes. A handler that returns a Raw, or
// a call or event given one as payload, sends it verbatim (it must hold
// exactly one value). An empty Raw is no payload at all, which is how a
// request without a payload arrives (Request.Payload is then nil).
//
// Raw also works inside values encoded with msgpack (a struct field, a
// map value): it is written there as it is, and decoded as the value's
// bytes (but msgpack decodes a nil there as an empty Raw: Field keeps it).
type Raw []byte

// Decode decodes the value into v (a pointer), with
// github.com/vmihailenco/msgpack/v5. An empty Raw decodes as nil.
func (r Raw) Decode(v any) error {
	if len(r) == 0 {
		return msgpack.Unmarshal(nilValue, v)
	}
	return msgpack.Unmarshal(r, v)
}

// EncodeMsgpack writes r verbatim (nil when empty).
func (r Raw) EncodeMsgpack(enc *msgpack.Encoder) error {
	if len(r) == 0 {
		return enc.EncodeNil()
	}
	_, err := enc.Writer().Write(r)
	return err
}

// DecodeMsgpack keeps the next value's bytes.
func (r *Raw) DecodeMsgpack(dec *msgpack.Decoder) error {
	raw, err := dec.DecodeRaw()
	if err != nil {
		return err
	}
	*r = append((*r)[:0], raw...)
	return nil
}

var nilValue = []byte{0xc0}

// Nil is the MessagePack nil, as a Raw: a handler that returns it replies
// with a nil payload (as does one that returns a nil any).
var Nil = Raw{0xc0}

// encoders keeps msgpack encoders with their buffers between uses.
var encoders = sync.Pool{New: func() any {
	e := &valueEncoder{}
	e.enc = msgpack.NewEncoder(&e.buf)
	e.enc.UseCompactInts(true)
	return e
}}

type valueEncoder struct {
	buf bytes.Buffer
	enc *msgpack.Encoder
}

// encodeValue returns v's MessagePack bytes: a Raw (checked) as it is,
// nil as MessagePack nil, anything else through msgpack (integers in
// their shortest form). The result may alias a Raw; release must be
// called once it has been copied.
func encodeValue(v any) (b []byte, release func(), err error) {
	switch x := v.(type) {
	case Raw:
		if len(x) == 0 {
			return nil, noRelease, nil
		}
		if err := checkValue(x); err != nil {
			return nil, noRelease, &CallError{Code: CodeInternal, Message: "invalid Raw payload: " + err.Error()}
		}
		return x, noRelease, nil
	case nil:
		return nilValue, noRelease, nil
	}
	e := encoders.Get().(*valueEncoder)
	e.buf.Reset()
	if err := e.enc.Encode(v); err != nil {
		encoders.Put(e)
		return nil, noRelease, &CallError{Code: CodeInternal, Message: "cannot encode the payload: " + err.Error()}
	}
	return e.buf.Bytes(), func() {
		if e.buf.Cap() <= 1<<16 {
			encoders.Put(e)
		}
	}, nil
}

func noRelease() {}

// Field returns the value under key in r, which must be a map with str
// keys, as its bytes (not decoded: verbatim); nil when the map has no
// such key.
func (r Raw) Field(key string) (Raw, error) {
	if len(r) == 0 {
		return nil, &CallError{Code: CodeBadRequest, Message: "the payload must be a map, found none"}
	}
	n, p, err := readMapLen(r, 0)
	if err != nil {
		return nil, &CallError{Code: CodeBadRequest, Message: "the payload must be a map, found " + kindName(r[0])}
	}
	for i := 0; i < n; i++ {
		k, q, err := readStr(r, p)
		if err != nil && !isTypeError(err) {
			return nil, &CallError{Code: CodeBadRequest, Message: err.Error()}
		}
		if err != nil { // a key that is not a str
			if q, err = skipValue(r, p); err != nil {
				return nil, &CallError{Code: CodeBadRequest, Message: err.Error()}
			}
		}
		end, err := skipValue(r, q)
		if err != nil {
			return nil, &CallError{Code: CodeBadRequest, Message: err.Error()}
		}
		if k != nil && string(k) == key {
			return r[q:end:end], nil
		}
		p = end
	}
	return nil, nil
}
