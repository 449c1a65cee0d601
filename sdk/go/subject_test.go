package procbroker

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// The test binary also runs as a service (a child of the test, or of the
// broker) when this variable names a role.
const roleEnv = "PROCBROKER_GO_TEST_ROLE"

var (
	buildDir   string
	buildOnce  sync.Once
	subjectBin string
	buildErr   error
)

func TestMain(m *testing.M) {
	if role := os.Getenv(roleEnv); role != "" {
		os.Exit(runRole(role))
	}
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// runRole runs the test binary as a service.
func runRole(role string) int {
	svc := NewService()
	switch role {
	case "printer":
		// A handler that prints to stdout, as a careless one would.
		svc.Handle("Print", func(ctx context.Context, req *Request) (any, error) {
			fmt.Println("hello from a stray Println")
			os.Stdout.WriteString("and from os.Stdout\n")
			return "printed", nil
		})
		if err := svc.Run(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return 0
	case "driver":
		return runDriver(svc)
	}
	fmt.Fprintf(os.Stderr, "unknown role %q\n", role)
	return 2
}

// subject builds the conformance subject once and returns its path.
func subject(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "procbroker-go-sdk-")
		if buildErr != nil {
			return
		}
		subjectBin = filepath.Join(buildDir, "subject")
		out, err := exec.Command("go", "build", "-o", subjectBin, "./conformance").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build ./conformance: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return subjectBin
}

const me = "subject.0"

func startSubject(t *testing.T) (*fakeBroker, *exec.Cmd) {
	return spawn(t, me, []string{subject(t)})
}

// value calls method on the subject and returns the reply's payload.
func value(t *testing.T, b *fakeBroker, method string, payload any) any {
	t.Helper()
	reply := b.call(b.request(method, payload))
	if reply.Type != "response" || reply.More {
		t.Fatalf("%v", reply)
	}
	return reply.value(t)
}

// activeReaches polls Active until it reads n, for at most within.
func activeReaches(t *testing.T, b *fakeBroker, n int64, within time.Duration) time.Duration {
	t.Helper()
	started := time.Now()
	for {
		got := value(t, b, "Active", nil).(map[string]any)
		if toInt(got["sleeping"]) == n {
			return time.Since(started)
		}
		if time.Since(started) > within {
			t.Fatalf("Active %v after %v, want %d", got, within, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func lastCancel(t *testing.T, b *fakeBroker) any { return value(t, b, "LastCancel", nil) }

func TestSubjectPingEchoFailWhoAmI(t *testing.T) {
	b, cmd := startSubject(t)
	if v := value(t, b, "Ping", nil); fmt.Sprint(v) != "map[]" {
		t.Fatalf("Ping: %v", v)
	}
	odd := msgpack.RawMessage{0xcd, 0x00, 0x07}
	if reply := b.call(b.request("Echo", odd)); !bytes.Equal(reply.payload, odd) {
		t.Fatalf("% x", reply.payload)
	}
	if reply := b.call(b.request("Echo", nil)); reply.has("payload") {
		t.Fatalf("%v", reply)
	}
	reply := b.call(b.request("Fail", map[string]any{"code": "nope", "message": "no way"}))
	if reply.Type != "error" || reply.Code != "nope" || reply.Error != "no way" {
		t.Fatalf("%v", reply)
	}
	if reply := b.call(b.request("Fail", map[string]any{"message": "plain"})); reply.Code != CodeHandler {
		t.Fatalf("%v", reply)
	}
	who := value(t, b, "WhoAmI", nil).(map[string]any)
	if who["id"] != me || toInt(who["pid"]) != int64(cmd.Process.Pid) {
		t.Fatalf("%v", who)
	}
	if reply := b.call(b.request("Nope", nil)); reply.Code != CodeUnknownMethod {
		t.Fatalf("%v", reply)
	}
}

func TestSubjectSeesItsDeadline(t *testing.T) {
	b, _ := startSubject(t)
	left := toInt(b.call(b.request("Deadline", nil, "timeout_ms", 5000)).value(t))
	if left < 4000 || left > 5000 {
		t.Fatalf("%d ms left of 5000", left)
	}
	if v := value(t, b, "Deadline", nil); v != nil {
		t.Fatalf("%v without a deadline", v)
	}
}

func TestSubjectStopsAtTheBrokersCancel(t *testing.T) {
	b, _ := startSubject(t)
	sleep := b.request("Sleep", map[string]any{"ms": 10000}, "timeout_ms", 300)
	b.send(sleep)
	activeReaches(t, b, 1, 5*time.Second)
	if v := lastCancel(t, b); v != nil {
		t.Fatalf("%v", v)
	}
	b.cancel(sleep, ReasonTimeout)
	stopped := activeReaches(t, b, 0, 500*time.Millisecond)
	t.Logf("Sleep stopped %v after the cancel", stopped)
	want := fmt.Sprint(map[string]any{"correlation_id": sleep["correlation_id"], "reason": "timeout"})
	if got := lastCancel(t, b).(map[string]any); fmt.Sprint(map[string]any{"correlation_id": uint64(toInt(got["correlation_id"])), "reason": got["reason"]}) != want {
		t.Fatalf("%v, want %s", got, want)
	}
	// The cancelled request is not answered.
	value(t, b, "Ping", nil)
	b.quiet(200 * time.Millisecond)
	for _, reason := range []string{ReasonCancelled, ReasonCallerExited, ReasonBusy, ReasonShuttingDown} {
		sleep := b.request("Sleep", map[string]any{"ms": 10000})
		b.send(sleep)
		activeReaches(t, b, 1, 5*time.Second)
		b.cancel(sleep, reason)
		activeReaches(t, b, 0, 500*time.Millisecond)
		if got := lastCancel(t, b).(map[string]any); got["reason"] != reason {
			t.Fatalf("%v, want %s", got, reason)
		}
	}
}

func TestSubjectIgnoresOtherCancels(t *testing.T) {
	b, _ := startSubject(t)
	sleep := b.request("Sleep", map[string]any{"ms": 300})
	b.send(sleep)
	activeReaches(t, b, 1, 5*time.Second)
	cid := sleep["correlation_id"]
	b.send(msg{"type": "event", "id": "cancel", "source": "client.0", "target": me, "correlation_id": cid,
		"payload": map[string]any{"source": "client.0", "reason": "cancelled"}})
	b.send(msg{"type": "event", "id": "cancel", "source": "broker", "target": me, "correlation_id": cid,
		"payload": map[string]any{"source": "client.9", "reason": "cancelled"}})
	b.send(msg{"type": "event", "id": "cancel", "source": "broker", "target": me, "correlation_id": uint64(424242),
		"payload": map[string]any{"source": "client.0", "reason": "cancelled"}})
	b.send(msg{"type": "event", "id": "cancel", "source": "broker", "target": me, "correlation_id": cid})
	reply := b.expect("the Sleep's reply")
	slept := reply.value(t).(map[string]any)
	if reply.CorrelationID != cid || slept["cancelled"] != false || toInt(slept["slept_ms"]) < 290 {
		t.Fatalf("%v %v", reply, slept)
	}
	if v := lastCancel(t, b); v != nil {
		t.Fatalf("%v", v)
	}
}

func TestSubjectCountStreamsOnlyToAStreamRequest(t *testing.T) {
	b, _ := startSubject(t)
	count := b.request("Count", map[string]any{"n": 5, "delay_ms": 2}, "stream", true)
	b.send(count)
	for i := 0; i < 5; i++ {
		part := b.expect("a partial reply")
		if !part.More || part.CorrelationID != count["correlation_id"] || part.ID != "Count" ||
			part.Target != "client.0" || toInt(part.value(t)) != int64(i) {
			t.Fatalf("%d: %v", i, part)
		}
	}
	if last := b.expect("the final reply"); last.More || toInt(last.value(t)) != 5 {
		t.Fatalf("%v", last)
	}
	if last := b.call(b.request("Count", map[string]any{"n": 5})); last.More || toInt(last.value(t)) != 5 {
		t.Fatalf("%v", last)
	}
	value(t, b, "Ping", nil)
}

func TestSubjectACutStreamStopsProducing(t *testing.T) {
	b, _ := startSubject(t)
	count := b.request("Count", map[string]any{"n": 100000, "delay_ms": 5}, "stream", true)
	b.send(count)
	for i := 0; i < 3; i++ {
		if !b.expect("a partial").More {
			t.Fatal("not a partial")
		}
	}
	b.cancel(count, ReasonBusy)
	quiet := time.Now()
	for f := b.recv(200 * time.Millisecond); f != nil; f = b.recv(200 * time.Millisecond) {
		if !f.More || time.Since(quiet) > 2*time.Second {
			t.Fatalf("after the cut: %v", f)
		}
	}
	got := lastCancel(t, b).(map[string]any)
	if uint64(toInt(got["correlation_id"])) != count["correlation_id"] || got["reason"] != ReasonBusy {
		t.Fatalf("%v", got)
	}
}

func TestSubjectEightSleepsAtOnce(t *testing.T) {
	b, _ := startSubject(t)
	started := time.Now()
	for i := 0; i < 8; i++ {
		b.send(b.request("Sleep", map[string]any{"ms": 200}))
	}
	for i := 0; i < 8; i++ {
		if reply := b.expect("a Sleep's reply"); reply.value(t).(map[string]any)["cancelled"] != false {
			t.Fatalf("%v", reply)
		}
	}
	took := time.Since(started)
	t.Logf("8 × Sleep 200 took %v", took)
	if took > 600*time.Millisecond {
		t.Fatalf("%v", took)
	}
}

func TestSubjectRelaysWithItsBudgetAndPassesTheCancelOn(t *testing.T) {
	b, _ := startSubject(t)
	relay := b.request("Relay", map[string]any{"target": "echo", "method": "Echo", "payload": "hi"}, "timeout_ms", 5000)
	b.send(relay)
	out := b.expect("the relayed request")
	if out.Type != "request" || out.Target != "echo" || out.ID != "Echo" || out.TimeoutMs < 4000 ||
		out.TimeoutMs > 5000 || out.value(t) != "hi" {
		t.Fatalf("%v (timeout %d)", out, out.TimeoutMs)
	}
	b.send(msg{"type": "response", "id": "Echo", "correlation_id": out.CorrelationID, "source": "echo.0",
		"target": me, "payload": msgpack.RawMessage(out.payload)})
	if reply := b.expect("the Relay's reply"); reply.CorrelationID != relay["correlation_id"] || reply.value(t) != "hi" {
		t.Fatalf("%v", reply)
	}
	// A nil payload is relayed as nil, none as none.
	b.send(b.request("Relay", map[string]any{"target": "echo", "method": "Echo", "payload": nil}))
	if out := b.expect("the relayed request"); !bytes.Equal(out.payload, []byte{0xc0}) {
		t.Fatalf("%v", out)
	} else {
		b.send(msg{"type": "error", "id": "Echo", "correlation_id": out.CorrelationID, "source": "echo.0",
			"target": me, "code": "teapot", "error": "short and stout"})
	}
	if reply := b.expect("the Relay's error"); reply.Code != "teapot" || reply.Error != "short and stout" {
		t.Fatalf("%v", reply)
	}
	b.send(b.request("Relay", map[string]any{"target": "echo", "method": "Echo"}))
	out = b.expect("the relayed request")
	if out.has("payload") {
		t.Fatalf("%v", out)
	}
	b.send(msg{"type": "response", "id": "Echo", "correlation_id": out.CorrelationID, "source": "echo.0", "target": me})
	b.expect("the Relay's reply")
	// Cancelled, the Relay gives up its call, which cancels it at the broker.
	relay = b.request("Relay", map[string]any{"target": "slow", "method": "Wait"})
	b.send(relay)
	out = b.expect("the relayed request")
	b.cancel(relay, ReasonCallerExited)
	cancel := b.expect("the cancel of the call out")
	if cancel.Type != "event" || cancel.ID != "cancel" || cancel.Target != "broker" ||
		cancel.CorrelationID != out.CorrelationID || cancel.has("payload") {
		t.Fatalf("%v", cancel)
	}
	got := lastCancel(t, b).(map[string]any)
	if uint64(toInt(got["correlation_id"])) != relay["correlation_id"] || got["reason"] != ReasonCallerExited {
		t.Fatalf("%v", got)
	}
	// The late reply to the call out is dropped; nothing else comes.
	b.send(msg{"type": "response", "id": "Wait", "correlation_id": out.CorrelationID, "source": "slow.0", "target": me})
	b.quiet(200 * time.Millisecond)
}

func TestSubjectEventsBothWays(t *testing.T) {
	b, _ := startSubject(t)
	if v := value(t, b, "LastNote", nil); v != nil {
		t.Fatalf("%v", v)
	}
	b.send(msg{"type": "event", "id": "note", "source": "client.3", "target": me, "payload": map[string]any{"n": []int{1, 2}}})
	if v := value(t, b, "LastNote", nil); fmt.Sprint(v) != "map[n:[1 2]]" {
		t.Fatalf("%v", v)
	}
	notify := b.request("Notify", map[string]any{"target": "client.3", "event": "note", "payload": []bool{true}})
	b.send(notify)
	event := b.expect("the event")
	if event.Type != "event" || event.ID != "note" || event.Target != "client.3" || fmt.Sprint(event.value(t)) != "[true]" {
		t.Fatalf("%v", event)
	}
	reply := b.expect("Notify's reply")
	if reply.CorrelationID != notify["correlation_id"] || !bytes.Equal(reply.payload, []byte{0xc0}) {
		t.Fatalf("%v", reply)
	}
}

func TestSubjectServesKeyedRequests(t *testing.T) {
	b, _ := startSubject(t)
	if v := b.call(b.request("Echo", "k", "key", "session-1")).value(t); v != "k" {
		t.Fatalf("%v", v)
	}
	if v := b.call(b.request("Echo", "k", "key", 1)).value(t); v != "k" {
		t.Fatalf("a key that is not a str: %v", v)
	}
}

func TestSubjectShutdownOnlyFromTheBrokerThenDrainAndExit(t *testing.T) {
	b, cmd := startSubject(t)
	b.send(msg{"type": "event", "id": "shutdown", "source": "client.0", "target": me})
	value(t, b, "Ping", nil)
	select {
	case err := <-b.served:
		t.Fatalf("exited (%v) at a forged shutdown", err)
	default:
	}
	sleep := b.request("Sleep", map[string]any{"ms": 200})
	b.send(sleep)
	activeReaches(t, b, 1, 5*time.Second)
	b.send(msg{"type": "event", "id": "shutdown", "source": "broker", "target": me})
	if reply := b.expect("the Sleep's reply"); reply.CorrelationID != sleep["correlation_id"] {
		t.Fatalf("%v", reply)
	}
	select {
	case err := <-b.served:
		b.served <- err
		if err != nil {
			t.Fatalf("exit: %v\n%s", err, b.logs)
		}
	case <-time.After(2 * time.Second):
		t.Fatalf("pid %d still runs after draining", cmd.Process.Pid)
	}
}

func TestSubjectExitsWithinASecondOfEOF(t *testing.T) {
	b, _ := startSubject(t)
	b.send(b.request("Sleep", map[string]any{"ms": 60000}))
	activeReaches(t, b, 1, 5*time.Second)
	closed := time.Now()
	b.eof()
	select {
	case err := <-b.served:
		b.served <- err
		if err != nil {
			t.Fatalf("exit: %v\n%s", err, b.logs)
		}
	case <-time.After(time.Second):
		t.Fatal("still running 1 s after EOF")
	}
	t.Logf("exited %v after EOF", time.Since(closed))
}

func TestSubjectPipelinesTwentyThousandCalls(t *testing.T) {
	b, _ := startSubject(t)
	const n = 20000
	var batch []byte
	for i := 0; i < n; i++ {
		batch = append(batch, encodeFrame(t, b.request("Echo", i))...)
	}
	go b.write(batch)
	seen := map[uint64]bool{}
	for i := 0; i < n; i++ {
		f := b.expect("an Echo reply")
		if seen[f.CorrelationID] || toInt(f.value(t)) != int64(f.CorrelationID-101) {
			t.Fatalf("%v", f)
		}
		seen[f.CorrelationID] = true
	}
	b.quiet(50 * time.Millisecond)
}

// Whatever a handler prints goes to stderr; stdout carries frames only
// (the harness fails on anything else there).
func TestStrayPrintsNeverReachStdout(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := spawn(t, "printer.0", []string{exe}, roleEnv+"=printer")
	if v := value(t, b, "Print", nil); v != "printed" {
		t.Fatalf("%v", v)
	}
	value(t, b, "Ping", nil)
	b.eof()
	if err := b.result(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	if logs := b.logs.String(); !strings.Contains(logs, "hello from a stray Println") || !strings.Contains(logs, "and from os.Stdout") {
		t.Fatalf("stderr: %q", logs)
	}
}
