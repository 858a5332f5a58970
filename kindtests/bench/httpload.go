//go:build linux

package bench

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// The L7 rows' client and server: a minimal keep-alive HTTP/1.1 client in
// the worker (raw request bytes, the status line and Content-Length parsed,
// nothing else), so the client costs little and the same in every column,
// and a Go net/http server as the pod.

// l7Body is the pod's answer to every request (small, fixed).
var l7Body = bytes.Repeat([]byte("k"), 64)

// runL7Server is the pod: net/http on l7Pod, every request answered with
// l7Body, connections kept alive.
func runL7Server() error {
	ln, err := net.Listen("tcp4", l7Pod.String())
	if err != nil {
		return err
	}
	return http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write(l7Body)
	}))
}

// httpConn is one keep-alive client connection.
type httpConn struct {
	c   net.Conn
	r   *bufio.Reader
	req []byte
}

// errServerClose: the answer asked to close the connection (Envoy does so
// while draining a listener).
var errServerClose = errors.New("server closed the connection (Connection: close)")

func dialHTTP(addr, path string, timeout time.Duration) (*httpConn, error) {
	c, err := net.DialTimeout("tcp4", addr, timeout)
	if err != nil {
		return nil, err
	}
	return &httpConn{c: c, r: bufio.NewReaderSize(c, 4096),
		req: []byte("GET " + path + " HTTP/1.1\r\nHost: " + addr + "\r\nUser-Agent: kebpf-bench\r\n\r\n")}, nil
}

// do sends one GET and reads the whole answer; it returns the status code.
func (h *httpConn) do() (int, error) {
	if _, err := h.c.Write(h.req); err != nil {
		return 0, err
	}
	line, err := h.r.ReadSlice('\n')
	if err != nil {
		return 0, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return 0, fmt.Errorf("bad status line %q", line)
	}
	code, err := strconv.Atoi(string(line[9:12]))
	if err != nil {
		return 0, fmt.Errorf("bad status line %q", line)
	}
	length, closing := -1, false
	for {
		l, err := h.r.ReadSlice('\n')
		if err != nil {
			return code, err
		}
		l = bytes.TrimSpace(l)
		if len(l) == 0 {
			break
		}
		k, v, _ := bytes.Cut(l, []byte(":"))
		v = bytes.TrimSpace(v)
		switch {
		case bytes.EqualFold(k, []byte("content-length")):
			if length, err = strconv.Atoi(string(v)); err != nil {
				return code, fmt.Errorf("bad content-length %q", v)
			}
		case bytes.EqualFold(k, []byte("connection")) && bytes.EqualFold(v, []byte("close")):
			closing = true
		}
	}
	if length < 0 {
		return code, errors.New("answer without content-length")
	}
	if _, err := h.r.Discard(length); err != nil {
		return code, err
	}
	if closing {
		return code, errServerClose
	}
	return code, nil
}

func (h *httpConn) close() { h.c.Close() }

// l7WarmRequests per connection precede every load sample, unmeasured.
const l7WarmRequests = 200

// httpLoadOp runs req.Count keep-alive connections to req.Addr, each a
// closed loop of GET req.Path (the next request when the answer is read),
// for req.TimeoutMs after a warm-up: P50us/P99us over every request whose
// answer had status req.Status, ConnPerSec = such requests per second.
// Any other status or a broken connection counts as an error (the
// connection is opened again).
func httpLoadOp(req workerReq) workerResp {
	n := max(1, req.Count)
	d := time.Duration(req.TimeoutMs) * time.Millisecond
	type result struct {
		lat  []time.Duration
		errs int
		err  error
	}
	results := make([]result, n)
	var ready, done sync.WaitGroup
	start := make(chan struct{})
	var t0 time.Time
	for i := range results {
		ready.Add(1)
		done.Add(1)
		go func(res *result) {
			defer done.Done()
			var h *httpConn
			once := func() error {
				if h == nil {
					var err error
					if h, err = dialHTTP(req.Addr, req.Path, time.Second); err != nil {
						return err
					}
					_ = h.c.SetDeadline(time.Now().Add(d + 10*time.Second))
				}
				code, err := h.do()
				if err != nil {
					h.close()
					h = nil
				}
				if err == nil && code != req.Status {
					err = fmt.Errorf("status %d, want %d", code, req.Status)
				}
				return err
			}
			for range l7WarmRequests {
				_ = once()
			}
			ready.Done()
			<-start
			end := t0.Add(d)
			res.lat = make([]time.Duration, 0, 1<<14)
			for {
				t := time.Now()
				if !t.Before(end) {
					break
				}
				if err := once(); err != nil {
					res.errs++
					res.err = err
					continue
				}
				res.lat = append(res.lat, time.Since(t))
			}
			if h != nil {
				h.close()
			}
		}(&results[i])
	}
	ready.Wait()
	t0 = time.Now()
	close(start)
	done.Wait()
	wall := time.Since(t0)
	var all []time.Duration
	var errs int
	var firstErr error
	for _, r := range results {
		all = append(all, r.lat...)
		errs += r.errs
		if firstErr == nil {
			firstErr = r.err
		}
	}
	return connResp(all, errs, firstErr, wall)
}

// verdictOp asks GET req.Path on a new connection to req.Addr, again every
// 200µs, until the answer has status req.Status: Mono is when that answer
// was read (the first request enforced with the new verdict).
func verdictOp(req workerReq) workerResp {
	deadline := time.Now().Add(time.Duration(req.TimeoutMs) * time.Millisecond)
	last := "no attempt"
	for time.Now().Before(deadline) {
		h, err := dialHTTP(req.Addr, req.Path, 200*time.Millisecond)
		if err == nil {
			_ = h.c.SetDeadline(time.Now().Add(time.Second))
			var code int
			code, err = h.do()
			h.close()
			if err == nil || errors.Is(err, errServerClose) {
				if code == req.Status {
					return workerResp{OK: true, Mono: monoNow()}
				}
				err = fmt.Errorf("status %d", code)
			}
		}
		last = err.Error()
		time.Sleep(200 * time.Microsecond)
	}
	return workerResp{Err: fmt.Sprintf("no answer with status %d: last %s", req.Status, last)}
}
