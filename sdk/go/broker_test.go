package procbroker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// brokerBin is the procbroker binary: $PROCBROKER_BIN, else the
// repository's release build, else its debug build. Without one the test
// fails: these tests are what shows the SDK works under the real broker.
func brokerBin(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("PROCBROKER_BIN"); bin != "" {
		return bin
	}
	repo, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"target/release/procbroker", "target/debug/procbroker"} {
		if _, err := os.Stat(filepath.Join(repo, p)); err == nil {
			return filepath.Join(repo, p)
		}
	}
	t.Fatalf("no procbroker binary: set PROCBROKER_BIN, or build %s/target/release/procbroker (cargo build --release)", repo)
	return ""
}

// brokerEnv is this process's environment for the broker, without
// PROCBROKER_BIN (the broker takes every PROCBROKER_ variable for a
// setting, and refuses those it does not know).
func brokerEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PROCBROKER_BIN=") {
			env = append(env, kv)
		}
	}
	return env
}

// The conformance kit, run against the Go subject.
func TestConformanceKit(t *testing.T) {
	bin := brokerBin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	kit := exec.CommandContext(ctx, bin, "conformance", "--", subject(t))
	kit.Env = brokerEnv()
	out, err := kit.CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("%s conformance -- %s: %v", bin, subject(t), err)
	}
}

// Checks that need the broker's side of the request lifecycle: the
// deadline stamped on local deliveries, cancel routed both ways, partial
// replies forwarded, keyed routing.
var lifecycleChecks = map[string]string{
	"stream":                     "partial replies forwarded",
	"timeout reaches the worker": "cancel sent to the worker at the deadline",
	"caller cancel":              "cancel from a caller routed to the worker",
	"keyed routing":              "keyed routing",
}

// The subject (two workers) and a driver written with the SDK, under
// `procbroker run`: the driver calls the subject through the broker and
// writes what it found to a file.
func TestUnderTheBroker(t *testing.T) {
	bin := brokerBin(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	result := filepath.Join(dir, "result.json")
	config := filepath.Join(dir, "procbroker.toml")
	toml := fmt.Sprintf(`[admin]
listen = ""

[sysmon]
interval_ms = 0

[[service]]
name = "subject"
command = %q
workers = 2

[[service]]
name = "driver"
command = %q
env = { %s = "driver", PROCBROKER_GO_TEST_RESULT = %q }
depends_on = ["subject"]
restart = { max_restarts = 0 }
`, subject(t), exe, roleEnv, result)
	if err := os.WriteFile(config, []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	broker := exec.Command(bin, "run", "--config", config)
	broker.Env = brokerEnv()
	broker.Stdout, broker.Stderr = &logs, &logs
	if err := broker.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- broker.Wait() }()
	defer func() {
		if broker.ProcessState == nil {
			_ = broker.Process.Kill()
		}
	}()

	var found map[string]string
	deadline := time.Now().Add(90 * time.Second)
	for found == nil {
		if b, err := os.ReadFile(result); err == nil {
			if err := json.Unmarshal(b, &found); err != nil {
				t.Fatalf("%s: %v", result, err)
			}
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("the broker exited (%v) before the driver was done:\n%s", err, logs.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no result from the driver in 90 s; the broker logged:\n%s", logs.String())
		}
	}

	// SIGTERM: the broker stops the services in order and exits 0.
	_ = broker.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("the broker's exit: %v\n%s", err, logs.String())
		}
	case <-time.After(30 * time.Second):
		t.Errorf("the broker still runs 30 s after SIGTERM:\n%s", logs.String())
	}

	names := make([]string, 0, len(found))
	for name := range found {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		outcome := found[name]
		t.Run(strings.ReplaceAll(name, " ", "_"), func(t *testing.T) {
			if outcome == "ok" {
				return
			}
			if needs, ok := lifecycleChecks[name]; ok {
				t.Fatalf("%s (needs the broker's %s)", outcome, needs)
			}
			t.Fatal(outcome)
		})
	}
	if len(found) < 10 {
		t.Fatalf("the driver reported %d checks: %v", len(found), found)
	}
}

// runDriver is the driver service of TestUnderTheBroker.
func runDriver(svc *Service) int {
	notes := make(chan *Event, 16)
	svc.OnEvent("note", func(ctx context.Context, ev *Event) { notes <- ev })
	err := svc.RunWith(func(ctx context.Context, s *Service) error {
		found := driverChecks(ctx, s, notes)
		b, err := json.Marshal(found)
		if err != nil {
			return err
		}
		path := os.Getenv("PROCBROKER_GO_TEST_RESULT")
		if err := os.WriteFile(path+".tmp", b, 0o644); err != nil {
			return err
		}
		return os.Rename(path+".tmp", path)
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// driverChecks calls the subject through the broker: each check "ok" or
// what went wrong.
func driverChecks(ctx context.Context, s *Service, notes chan *Event) map[string]string {
	found := map[string]string{}
	check := func(name string, f func() error) {
		if err := f(); err != nil {
			found[name] = err.Error()
		} else {
			found[name] = "ok"
		}
	}
	call := func(target, method string, payload any, opts ...CallOption) (any, error) {
		raw, err := s.Call(ctx, target, method, payload, opts...)
		if err != nil {
			return nil, err
		}
		var v any
		return v, raw.Decode(&v)
	}
	want := func(got any, err error, w string) error {
		if err != nil {
			return err
		}
		if fmt.Sprint(got) != w {
			return fmt.Errorf("got %v, want %s", got, w)
		}
		return nil
	}
	// Active on one process reaches 0 within a second.
	settles := func(target string) error {
		started := time.Now()
		for {
			got, err := call(target, "Active", nil)
			if err != nil {
				return err
			}
			if fmt.Sprint(got) == "map[sleeping:0]" {
				return nil
			}
			if time.Since(started) > time.Second {
				return fmt.Errorf("%s: Active %v a second on", target, got)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	lastCancelReason := func(target string) (any, error) {
		got, err := call(target, "LastCancel", nil)
		if err != nil || got == nil {
			return got, err
		}
		return got.(map[string]any)["reason"], nil
	}

	check("echo verbatim", func() error {
		raw, err := s.Call(ctx, "subject", "Echo", Raw{0xcd, 0, 7})
		if err == nil && !bytes.Equal(raw, []byte{0xcd, 0, 7}) {
			err = fmt.Errorf("% x", raw)
		}
		return err
	})
	check("echo of nothing", func() error {
		raw, err := s.Call(ctx, "subject", "Echo", Raw(nil))
		if err == nil && raw != nil {
			err = fmt.Errorf("% x", raw)
		}
		return err
	})
	check("error code and message", func() error {
		_, err := s.Call(ctx, "subject", "Fail", map[string]any{"code": "teapot", "message": "short and stout"})
		var ce *CallError
		if !errors.As(err, &ce) || ce.Code != "teapot" || ce.Message != "short and stout" || !strings.HasPrefix(ce.Source, "subject.") {
			return fmt.Errorf("%#v", err)
		}
		return nil
	})
	check("unknown method", func() error {
		_, err := s.Call(ctx, "subject", "Nope", nil)
		if !isCode(err, CodeUnknownMethod) {
			return fmt.Errorf("%v", err)
		}
		return nil
	})
	check("count without a stream", func() error {
		got, err := call("subject", "Count", map[string]any{"n": 3})
		return want(got, err, "3")
	})
	check("relay", func() error {
		got, err := call("subject", "Relay", map[string]any{"target": "subject", "method": "Echo", "payload": "through"})
		return want(got, err, "through")
	})
	check("relay of an error", func() error {
		_, err := s.Call(ctx, "subject", "Relay", map[string]any{"target": "subject", "method": "Fail",
			"payload": map[string]any{"code": "teapot", "message": "relayed"}})
		var ce *CallError
		if !errors.As(err, &ce) || ce.Code != "teapot" || ce.Message != "relayed" {
			return fmt.Errorf("%#v", err)
		}
		return nil
	})
	check("deadline", func() error {
		got, err := call("subject.0", "Deadline", nil, WithTimeout(4*time.Second))
		if err != nil {
			return err
		}
		if ms := toInt(got); ms < 3000 || ms > 4000 {
			return fmt.Errorf("%v ms left of 4000", got)
		}
		return nil
	})
	check("events both ways", func() error {
		if err := s.Emit("subject.0", "note", map[string]any{"k": 1}); err != nil {
			return err
		}
		got, err := call("subject.0", "LastNote", nil)
		if err := want(got, err, "map[k:1]"); err != nil {
			return err
		}
		if _, err := call("subject.1", "Notify", map[string]any{"target": s.ProcessID(), "event": "note", "payload": "back"}); err != nil {
			return err
		}
		select {
		case ev := <-notes:
			var v string
			if ev.Source != "subject.1" || ev.Decode(&v) != nil || v != "back" {
				return fmt.Errorf("%+v", ev)
			}
		case <-time.After(5 * time.Second):
			return errors.New("no note came back")
		}
		return nil
	})
	check("20000 pipelined calls", func() error {
		const n = 20000
		var wg sync.WaitGroup
		errs := make(chan error, n)
		sem := make(chan struct{}, 500)
		for i := 0; i < n; i++ {
			wg.Add(1)
			sem <- struct{}{}
			go func(i int) {
				defer wg.Done()
				defer func() { <-sem }()
				raw, err := s.Call(ctx, "subject", "Echo", i)
				var back int
				if err == nil {
					err = raw.Decode(&back)
				}
				if err == nil && back != i {
					err = fmt.Errorf("call %d got %d", i, back)
				}
				if err != nil {
					errs <- err
				}
			}(i)
		}
		wg.Wait()
		close(errs)
		return <-errs
	})
	check("stream", func() error {
		st, err := s.Stream(ctx, "subject", "Count", map[string]any{"n": 3})
		if err != nil {
			return err
		}
		var parts []string
		for {
			part, more, err := st.Next(ctx)
			if err != nil {
				return fmt.Errorf("after %v: %w", parts, err)
			}
			var v int
			if err := part.Decode(&v); err != nil {
				return err
			}
			parts = append(parts, fmt.Sprint(v, more))
			if !more {
				break
			}
		}
		if got := strings.Join(parts, " "); got != "0 true 1 true 2 true 3 false" {
			return fmt.Errorf("got %s", got)
		}
		return nil
	})
	check("timeout reaches the worker", func() error {
		started := time.Now()
		_, err := s.Call(ctx, "subject.1", "Sleep", map[string]any{"ms": 10000}, WithTimeout(300*time.Millisecond))
		if !isCode(err, CodeTimeout) {
			return fmt.Errorf("the call: %v after %v", err, time.Since(started))
		}
		if err := settles("subject.1"); err != nil {
			return err
		}
		reason, err := lastCancelReason("subject.1")
		return want(reason, err, ReasonTimeout)
	})
	check("caller cancel", func() error {
		cctx, cancel := context.WithCancel(ctx)
		go func() { time.Sleep(200 * time.Millisecond); cancel() }()
		_, err := s.Call(cctx, "subject.0", "Sleep", map[string]any{"ms": 10000})
		if !isCode(err, CodeCancelled) {
			return fmt.Errorf("the call: %v", err)
		}
		if err := settles("subject.0"); err != nil {
			return err
		}
		reason, err := lastCancelReason("subject.0")
		return want(reason, err, ReasonCancelled)
	})
	check("keyed routing", func() error {
		ids := map[any]bool{}
		for i := 0; i < 10; i++ {
			got, err := call("subject", "WhoAmI", nil, WithKey("user-17"))
			if err != nil {
				return err
			}
			ids[got.(map[string]any)["id"]] = true
		}
		if len(ids) != 1 {
			return fmt.Errorf("one key reached %v", ids)
		}
		return nil
	})
	return found
}
