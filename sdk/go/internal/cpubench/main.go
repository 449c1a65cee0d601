// Command cpubench measures an echo worker's CPU time per call: it starts
// each worker command given, pipes it N requests with D in flight (one
// batch of bytes, the same for every worker), and reads the worker's own
// user+system time from its rusage at exit, less what a run without
// requests costs it (start-up and handshake). Workers are run in turns,
// R rounds, so that they see the same machine.
//
//	go run ./internal/cpubench -n 200000 -depth 64 -rounds 3 \
//	    -worker 'rust=/work/bin/procbroker worker echo' \
//	    -worker 'go=/tmp/subject'
package main

import (
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

type workers []string

func (w *workers) String() string     { return strings.Join(*w, ",") }
func (w *workers) Set(v string) error { *w = append(*w, v); return nil }

func main() {
	n := flag.Int("n", 200000, "requests per run")
	depth := flag.Int("depth", 64, "requests in flight")
	rounds := flag.Int("rounds", 3, "runs of each worker")
	method := flag.String("method", "Echo", "method called")
	var ws workers
	flag.Var(&ws, "worker", "NAME=COMMAND ARGS… (repeat)")
	flag.Parse()
	if len(ws) == 0 {
		fmt.Fprintln(os.Stderr, "cpubench: give at least one -worker NAME=COMMAND")
		os.Exit(2)
	}
	request := func(cid uint64) []byte {
		body, err := msgpack.Marshal(map[string]any{
			"type": "request", "id": *method, "correlation_id": cid,
			"source": "client.0", "target": "echo.0", "timeout_ms": 30000,
			"payload": map[string]any{"name": "test", "value": 123},
		})
		if err != nil {
			panic(err)
		}
		frame := make([]byte, 4, 4+len(body))
		binary.BigEndian.PutUint32(frame, uint32(len(body)))
		return append(frame, body...)
	}
	frames := make([][]byte, *n)
	for i := range frames {
		frames[i] = request(uint64(i + 1))
	}
	results := map[string][]float64{}
	var names []string
	for r := 0; r < *rounds; r++ {
		for _, w := range ws {
			name, cmd, ok := strings.Cut(w, "=")
			if !ok {
				fmt.Fprintf(os.Stderr, "cpubench: %q is not NAME=COMMAND\n", w)
				os.Exit(2)
			}
			if r == 0 {
				names = append(names, name)
			}
			base, _, err := run(strings.Fields(cmd), nil, *depth)
			if err != nil {
				fmt.Fprintf(os.Stderr, "cpubench: %s: %v\n", name, err)
				os.Exit(1)
			}
			cpu, wall, err := run(strings.Fields(cmd), frames, *depth)
			if err != nil {
				fmt.Fprintf(os.Stderr, "cpubench: %s: %v\n", name, err)
				os.Exit(1)
			}
			perCall := float64(cpu-base) / float64(len(frames)) / 1e3
			results[name] = append(results[name], perCall)
			fmt.Printf("round %d %-14s cpu %8.1f ms (start-up %5.1f ms)  %6.3f µs/call  %8.0f calls/s\n",
				r+1, name, float64(cpu)/1e6, float64(base)/1e6, perCall, float64(len(frames))/wall.Seconds())
		}
	}
	fmt.Printf("worker CPU per call, %d requests, %d in flight, %d rounds (medians; the ratio is the median of each round's ratio):\n",
		*n, *depth, *rounds)
	first := results[names[0]]
	for _, name := range names {
		ratios := make([]float64, len(first))
		for r := range first {
			ratios[r] = results[name][r] / first[r]
		}
		fmt.Printf("  %-14s %6.3f µs  %.2f× %s (rounds %s)\n", name, median(results[name]), median(ratios),
			names[0], spread(ratios))
	}
}

func spread(v []float64) string {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return fmt.Sprintf("%.2f–%.2f", s[0], s[len(s)-1])
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// run starts the worker, waits for its ready, pipes frames with depth in
// flight, reads every reply, closes stdin and returns the worker's CPU
// time (ns) and the wall time of the requests.
func run(argv []string, frames [][]byte, depth int) (int64, time.Duration, error) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "PROCBROKER_PROCESS_ID=echo.0", "PROCBROKER_SERVICE=echo")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return 0, 0, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return 0, 0, err
	}
	if err := cmd.Start(); err != nil {
		return 0, 0, err
	}
	r := &reader{r: stdout, buf: make([]byte, 1<<16)}
	if _, err := r.frames(1); err != nil {
		return 0, 0, fmt.Errorf("no ready: %w", err)
	}
	started := time.Now()
	sent, got := 0, 0
	credit := depth
	var out []byte
	for got < len(frames) {
		out = out[:0]
		for credit > 0 && sent < len(frames) {
			out = append(out, frames[sent]...)
			sent++
			credit--
		}
		if len(out) > 0 {
			if _, err := stdin.Write(out); err != nil {
				return 0, 0, err
			}
		}
		k, err := r.frames(0)
		if err != nil {
			return 0, 0, fmt.Errorf("after %d replies: %w", got, err)
		}
		got += k
		credit += k
	}
	wall := time.Since(started)
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		return 0, 0, err
	}
	ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	cpu := syscall.TimevalToNsec(ru.Utime) + syscall.TimevalToNsec(ru.Stime)
	return cpu, wall, nil
}

type reader struct {
	r          io.Reader
	buf        []byte
	start, end int
}

// frames reads at least one chunk and returns how many whole frames it
// completed (at least min).
func (r *reader) frames(min int) (int, error) {
	count := 0
	for {
		n, err := r.r.Read(r.buf[r.end:])
		if n == 0 && err != nil {
			return count, err
		}
		r.end += n
		for r.end-r.start >= 4 {
			l := int(binary.BigEndian.Uint32(r.buf[r.start:]))
			if r.end-r.start < 4+l {
				break
			}
			r.start += 4 + l
			count++
		}
		copy(r.buf, r.buf[r.start:r.end])
		r.end -= r.start
		r.start = 0
		if count >= min && count > 0 || (min == 0 && count > 0) {
			return count, nil
		}
		if r.end == len(r.buf) {
			nb := make([]byte, 2*len(r.buf))
			copy(nb, r.buf[:r.end])
			r.buf = nb
		}
	}
}
