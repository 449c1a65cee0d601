package procbroker

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// pack encodes v with the msgpack library (an independent encoder).
func pack(t testing.TB, v any) []byte {
	t.Helper()
	b, err := msgpack.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// frameOf prefixes body with its length.
func frameOf(body []byte) []byte {
	f := make([]byte, 4, 4+len(body))
	binary.BigEndian.PutUint32(f, uint32(len(body)))
	return append(f, body...)
}

func TestDecodeEnvelopeReadsEveryKey(t *testing.T) {
	body := pack(t, map[string]any{
		"type": "request", "id": "Count", "correlation_id": uint64(math.MaxUint64),
		"source": "client.0", "target": "counter", "timeout_ms": 2500,
		"stream": true, "key": "user-17", "payload": msgpack.RawMessage{0x93, 1, 2, 3},
		"unknown": map[string]any{"nested": []any{1, "x", nil}},
	})
	var e envelope
	if err := decodeEnvelope(body, &e); err != nil {
		t.Fatal(err)
	}
	if e.kind != kindRequest || string(e.id) != "Count" || e.cid != math.MaxUint64 || !e.hasCID {
		t.Fatalf("%+v", e)
	}
	if string(e.source) != "client.0" || string(e.target) != "counter" || !e.hasTO || e.timeout != 2500 {
		t.Fatalf("%+v", e)
	}
	if !e.stream || e.more || !e.hasKey || string(e.key) != "user-17" {
		t.Fatalf("%+v", e)
	}
	if !bytes.Equal(e.payload, []byte{0x93, 1, 2, 3}) {
		t.Fatalf("payload % x", e.payload)
	}
}

func TestCorrelationIDsInEveryIntForm(t *testing.T) {
	forms := map[string][]byte{
		"fixint":           {0x07},
		"uint16 for 7":     {0xcd, 0x00, 0x07},
		"uint64 max":       {0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff},
		"int64 positive":   {0xd3, 0x00, 0x20, 0, 0, 0, 0, 0, 0x01},
		"int8 positive":    {0xd0, 0x05},
		"uint32":           {0xce, 0x00, 0x01, 0x00, 0x00},
		"2^53+1 as uint64": {0xcf, 0x00, 0x20, 0, 0, 0, 0, 0, 0x01},
	}
	want := map[string]uint64{
		"fixint": 7, "uint16 for 7": 7, "uint64 max": math.MaxUint64,
		"int64 positive": 1<<53 + 1, "int8 positive": 5, "uint32": 65536, "2^53+1 as uint64": 1<<53 + 1,
	}
	for name, form := range forms {
		body := pack(t, map[string]any{"type": "response", "id": "M", "correlation_id": msgpack.RawMessage(form)})
		var e envelope
		if err := decodeEnvelope(body, &e); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if e.cid != want[name] {
			t.Fatalf("%s: %d, want %d", name, e.cid, want[name])
		}
	}
	// Negative ids are not ids.
	body := pack(t, map[string]any{"type": "response", "id": "M", "correlation_id": -1})
	var e envelope
	if err := decodeEnvelope(body, &e); err == nil {
		t.Fatal("a negative correlation id was taken")
	}
}

func TestNilIsAbsentExceptInPayload(t *testing.T) {
	body := pack(t, map[string]any{
		"type": "event", "id": "note", "correlation_id": nil, "timeout_ms": nil,
		"stream": nil, "key": nil, "payload": nil, "source": nil,
	})
	var e envelope
	if err := decodeEnvelope(body, &e); err != nil {
		t.Fatal(err)
	}
	if e.hasCID || e.hasTO || e.stream || e.hasKey || e.source != nil {
		t.Fatalf("%+v", e)
	}
	if !bytes.Equal(e.payload, []byte{0xc0}) {
		t.Fatalf("a nil payload is a payload: % x", e.payload)
	}
	// A key that is not a str is the broker's business, not the worker's.
	body = pack(t, map[string]any{"type": "request", "id": "M", "correlation_id": 1, "key": 1})
	if err := decodeEnvelope(body, &e); err != nil || e.hasKey {
		t.Fatalf("%v %+v", err, e)
	}
}

func TestInvalidEnvelopes(t *testing.T) {
	cases := map[string]struct {
		body    []byte
		salvage bool // a request's correlation id is still known
	}{
		"not a map":          {pack(t, []any{"request", "Echo"}), false},
		"not msgpack":        {[]byte{0xc1}, false},
		"empty":              {nil, false},
		"cut short":          {pack(t, map[string]any{"type": "request", "id": "Echo"})[:8], false},
		"unknown type":       {pack(t, map[string]any{"type": "gossip", "id": "x", "correlation_id": 1}), false},
		"no type":            {pack(t, map[string]any{"id": "x", "correlation_id": 1}), false},
		"no id":              {pack(t, map[string]any{"type": "request", "correlation_id": 3}), true},
		"no correlation id":  {pack(t, map[string]any{"type": "request", "id": "x"}), false},
		"a key not a str":    {append([]byte{0x81, 0x01}, 0x02), false},
		"wrong type timeout": {pack(t, map[string]any{"type": "request", "id": "Echo", "correlation_id": 9, "source": "c.0", "timeout_ms": "soon"}), true},
		"wrong type stream":  {pack(t, map[string]any{"type": "request", "id": "Echo", "correlation_id": 9, "stream": "yes"}), true},
		"trailing bytes":     {append(pack(t, map[string]any{"type": "request", "id": "Echo", "correlation_id": 9}), 0x00), true},
		"duplicate key": {append(append([]byte{0x84}, pack(t, "type")...),
			append(append(pack(t, "request"), pack(t, map[string]any{"id": "x", "correlation_id": 9, "type": "request"})[1:]...))...), true},
	}
	for name, c := range cases {
		var e envelope
		err := decodeEnvelope(c.body, &e)
		if err == nil {
			t.Fatalf("%s: accepted", name)
		}
		salvaged := e.kind == kindRequest && e.hasCID
		if salvaged != c.salvage {
			t.Fatalf("%s: salvaged %v (%v), want %v", name, salvaged, err, c.salvage)
		}
	}
}

func TestSkipValueOfEveryType(t *testing.T) {
	values := []any{
		nil, true, false, 0, 127, 128, -1, -33, -200, 1 << 20, -(1 << 20), uint64(math.MaxUint64),
		int64(math.MinInt64), float32(1.5), 2.5, "", "short", strings.Repeat("s", 40),
		strings.Repeat("m", 300), strings.Repeat("l", 70000), []byte{}, []byte{1, 2},
		bytes.Repeat([]byte{9}, 300), bytes.Repeat([]byte{9}, 70000), []any{},
		make([]any, 20), map[string]any{}, map[string]any{"a": []any{map[string]any{"b": nil}}},
		time.Unix(1700000000, 5), time.Unix(1<<34, 0), time.Unix(1700000000, 0),
	}
	for _, v := range values {
		b := pack(t, v)
		if err := checkValue(b); err != nil {
			t.Fatalf("%T %v: %v", v, v, err)
		}
		if _, err := skipValue(b[:len(b)-1], 0); len(b) > 1 && err == nil {
			t.Fatalf("%T: a cut value was skipped", v)
		}
	}
	// Every ext form, as a timestamp or not.
	exts := [][]byte{
		{0xd4, 1, 0}, {0xd5, 1, 0, 0}, {0xd6, 0xff, 0, 0, 0, 0}, {0xd7, 0xff, 0, 0, 0, 0, 0, 0, 0, 0},
		append([]byte{0xd8, 5}, make([]byte, 16)...), {0xc7, 2, 7, 1, 2},
		{0xc8, 0, 1, 7, 1}, {0xc9, 0, 0, 0, 1, 7, 1}, append([]byte{0xc7, 12, 0xff}, make([]byte, 12)...),
	}
	for _, b := range exts {
		if err := checkValue(b); err != nil {
			t.Fatalf("% x: %v", b, err)
		}
	}
	// Counts that cannot fit in what follows are not believed.
	for _, lie := range [][]byte{{0xdd, 0xff, 0xff, 0xff, 0xff}, {0xdf, 0x7f, 0xff, 0xff, 0xff, 0x01}, {0xdb, 0xff, 0xff, 0xff, 0xff}} {
		if err := checkValue(lie); err == nil {
			t.Fatalf("% x accepted", lie)
		}
	}
	if err := checkValue([]byte{0x01, 0x02}); err == nil {
		t.Fatal("two values taken as one")
	}
}

// The envelopes written here read back through an independent decoder.
func TestWrittenEnvelopesDecode(t *testing.T) {
	type env struct {
		Type          string             `msgpack:"type"`
		ID            string             `msgpack:"id"`
		CorrelationID uint64             `msgpack:"correlation_id"`
		Target        string             `msgpack:"target"`
		Payload       msgpack.RawMessage `msgpack:"payload"`
		Error         string             `msgpack:"error"`
		Code          string             `msgpack:"code"`
		TimeoutMs     uint64             `msgpack:"timeout_ms"`
		Stream        bool               `msgpack:"stream"`
		More          bool               `msgpack:"more"`
		Key           string             `msgpack:"key"`
	}
	long := strings.Repeat("x", 70000)
	check := func(b []byte, want env, keys int) {
		t.Helper()
		var got env
		if err := msgpack.Unmarshal(b, &got); err != nil {
			t.Fatal(err)
		}
		if got.Type != want.Type || got.ID != want.ID || got.CorrelationID != want.CorrelationID ||
			got.Target != want.Target || got.Error != want.Error ||
			got.Code != want.Code || got.TimeoutMs != want.TimeoutMs || got.Stream != want.Stream ||
			got.More != want.More || got.Key != want.Key {
			t.Fatalf("got %+v\nwant %+v", got, want)
		}
		var m map[string]msgpack.RawMessage
		if err := msgpack.Unmarshal(b, &m); err != nil || len(m) != keys {
			t.Fatalf("%d keys (%v), want %d: %v", len(m), err, keys, m)
		}
		var e envelope
		if err := decodeEnvelope(b, &e); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(e.payload, want.Payload) {
			t.Fatalf("payload % x, want % x", e.payload, want.Payload)
		}
	}
	check(appendReply(nil, "Echo", "client.0", math.MaxUint64, []byte{0xcd, 0, 7}, false),
		env{Type: "response", ID: "Echo", CorrelationID: math.MaxUint64, Target: "client.0", Payload: []byte{0xcd, 0, 7}}, 5)
	check(appendReply(nil, "Count", "c.1", 3, nil, true),
		env{Type: "response", ID: "Count", CorrelationID: 3, Target: "c.1", More: true}, 5)
	check(appendErrorReply(nil, "M", "c.1", 1<<40, "teapot", long),
		env{Type: "error", ID: "M", CorrelationID: 1 << 40, Target: "c.1", Code: "teapot", Error: long}, 6)
	check(appendRequest(nil, "svc", "Get", 300, []byte{0xa1, 'k'}, 1500, true, "user-1", true),
		env{Type: "request", ID: "Get", CorrelationID: 300, Target: "svc", Payload: []byte{0xa1, 'k'},
			TimeoutMs: 1500, Stream: true, Key: "user-1"}, 8)
	check(appendRequest(nil, "svc", "Get", 70000, nil, 1, false, "", false),
		env{Type: "request", ID: "Get", CorrelationID: 70000, Target: "svc", TimeoutMs: 1}, 5)
	check(appendEvent(nil, "broker", "cancel", nil, 12, true),
		env{Type: "event", ID: "cancel", CorrelationID: 12, Target: "broker"}, 4)
	check(appendEvent(nil, "*", "note", []byte{0xc0}, 0, false),
		env{Type: "event", ID: "note", Target: "*", Payload: []byte{0xc0}}, 4)
}

func TestRawField(t *testing.T) {
	r := Raw(pack(t, map[string]any{"target": "echo", "payload": nil, "n": []any{1, 2}}))
	if v, err := r.Field("payload"); err != nil || !bytes.Equal(v, []byte{0xc0}) {
		t.Fatalf("% x %v", v, err)
	}
	if v, err := r.Field("n"); err != nil || !bytes.Equal(v, []byte{0x92, 1, 2}) {
		t.Fatalf("% x %v", v, err)
	}
	if v, err := r.Field("absent"); err != nil || v != nil {
		t.Fatalf("% x %v", v, err)
	}
	var ce *CallError
	if _, err := Raw(pack(t, 3)).Field("x"); !errors.As(err, &ce) || ce.Code != CodeBadRequest {
		t.Fatalf("%v", err)
	}
	if _, err := Raw(nil).Field("x"); !errors.As(err, &ce) || ce.Code != CodeBadRequest {
		t.Fatalf("%v", err)
	}
}

func TestRawDecodeAndEncode(t *testing.T) {
	var v any
	if err := Raw(nil).Decode(&v); err != nil || v != nil {
		t.Fatalf("%v %v", v, err)
	}
	var n uint64
	max := Raw{0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	if err := max.Decode(&n); err != nil || n != math.MaxUint64 {
		t.Fatal(n, err)
	}
	// A Raw inside an encoded value is written as it is (an empty one as nil).
	b := pack(t, []any{Raw{0xcd, 0, 7}, Raw(nil)})
	if !bytes.Equal(b, []byte{0x92, 0xcd, 0, 7, 0xc0}) {
		t.Fatalf("% x", b)
	}
	b = pack(t, map[string]any{"r": Raw{0xcd, 0, 7}})
	// And decodes as its bytes.
	var s struct {
		R Raw `msgpack:"r"`
	}
	if err := msgpack.Unmarshal(b, &s); err != nil || !bytes.Equal(s.R, []byte{0xcd, 0, 7}) {
		t.Fatalf("% x %v", s.R, err)
	}
	// encodeValue: Raw verbatim (checked), nil as nil, bytes as bin, ints short.
	type encoded struct {
		v    any
		want []byte
	}
	cases := []encoded{{Raw{0xcd, 0, 7}, []byte{0xcd, 0, 7}}, {nil, []byte{0xc0}}, {Raw(nil), nil},
		{[]byte{1}, []byte{0xc4, 1, 1}}, {int64(5), []byte{5}}, {uint64(math.MaxUint64), []byte{0xcf, 255, 255, 255, 255, 255, 255, 255, 255}}}
	for _, c := range cases {
		got, release, err := encodeValue(c.v)
		if err != nil || !bytes.Equal(got, c.want) {
			t.Fatalf("%#v: % x %v", c.v, got, err)
		}
		release()
	}
	if _, _, err := encodeValue(Raw{0x92, 1}); err == nil {
		t.Fatal("an invalid Raw was taken")
	}
	if _, _, err := encodeValue(make(chan int)); err == nil {
		t.Fatal("a channel was encoded")
	}
}

func TestFrameReaderAcrossPartialReads(t *testing.T) {
	big := bytes.Repeat([]byte{7}, 3*readChunk+5)
	var stream []byte
	bodies := [][]byte{{0x80}, big, {0xc0}, bytes.Repeat([]byte{1}, 100)}
	for _, b := range bodies {
		stream = append(stream, frameOf(b)...)
	}
	for name, r := range map[string]io.Reader{
		"one byte at a time": iotest.OneByteReader(bytes.NewReader(stream)),
		"half reads":         iotest.HalfReader(bytes.NewReader(stream)),
		"all at once":        bytes.NewReader(stream),
	} {
		f := newFrameReader(r, DefaultMaxFrameBytes)
		for i, want := range bodies {
			got, err := f.next()
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("%s: frame %d: %d bytes, %v", name, i, len(got), err)
			}
		}
		if _, err := f.next(); err != io.EOF {
			t.Fatalf("%s: %v at the end", name, err)
		}
	}
}

func TestFrameReaderOutOfSync(t *testing.T) {
	cut := frameOf(bytes.Repeat([]byte{1}, 50))[:30]
	f := newFrameReader(bytes.NewReader(cut), DefaultMaxFrameBytes)
	if _, err := f.next(); !errors.Is(err, ErrOutOfSync) {
		t.Fatalf("a frame cut by EOF: %v", err)
	}
	f = newFrameReader(bytes.NewReader([]byte{0, 0}), DefaultMaxFrameBytes)
	if _, err := f.next(); !errors.Is(err, ErrOutOfSync) {
		t.Fatalf("a length cut by EOF: %v", err)
	}
	over := []byte{0x01, 0x00, 0x00, 0x01} // 16 MiB + 1
	f = newFrameReader(bytes.NewReader(over), DefaultMaxFrameBytes)
	if _, err := f.next(); !errors.Is(err, ErrOutOfSync) || !strings.Contains(err.Error(), "16777217") {
		t.Fatalf("a length over the limit: %v", err)
	}
	// Text on the pipe reads as a huge length.
	f = newFrameReader(strings.NewReader("hello\n"), DefaultMaxFrameBytes)
	if _, err := f.next(); !errors.Is(err, ErrOutOfSync) {
		t.Fatalf("text: %v", err)
	}
}
