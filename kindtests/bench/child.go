//go:build linux

package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/servicelb"
)

// The harness re-runs its own executable for the processes that must live
// in a namespace or cgroup: the backend server, the client worker and the
// socket-LB agent. The role travels in this variable so the same dispatch
// works from kebpf-bench and from the test binary.
const childEnv = "KEBPF_BENCH_CHILD"

// Child runs the child role named in $KEBPF_BENCH_CHILD and exits; it
// returns false when the variable is unset. Call it first in main/TestMain.
func Child() bool {
	role := os.Getenv(childEnv)
	if role == "" {
		return false
	}
	var err error
	switch role {
	case "server":
		err = runServer()
	case "worker":
		err = runWorker(os.Stdin, os.Stdout)
	case "agent":
		err = runAgent()
	case "npserver":
		err = runNPServer()
	case "l7server":
		err = runL7Server()
	case "tracegen":
		err = runTraceGen(os.Stdin, os.Stdout)
	default:
		err = fmt.Errorf("unknown child role %q", role)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "kebpf-bench %s: %v\n", role, err)
		os.Exit(1)
	}
	os.Exit(0)
	return true
}

// runServer answers every connection with its own local address, so a
// client learns which backend it reached even when getpeername shows the
// ClusterIP.
func runServer() error {
	lc := net.ListenConfig{}
	ln, err := lc.Listen(context.Background(), "tcp4", fmt.Sprintf("0.0.0.0:%d", backendPort))
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			continue
		}
		go func() {
			_ = c.SetWriteDeadline(time.Now().Add(time.Second))
			_, _ = io.WriteString(c, c.LocalAddr().String()+"\n")
			c.Close()
		}()
	}
}

// monoNow is CLOCK_MONOTONIC in ns: the same clock in every process, so the
// harness and the worker can subtract each other's timestamps.
func monoNow() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

// workerReq and workerResp are the line-delimited JSON protocol between the
// harness and a worker.
type workerReq struct {
	Op        string `json:"op"` // lat | wait | sweep | conns | udprr, udpflows, http (TimeoutMs = duration) | verdict
	Addr      string `json:"addr,omitempty"`
	Count     int    `json:"count,omitempty"`  // http: connections
	Path      string `json:"path,omitempty"`   // http, verdict: the request's path
	Status    int    `json:"status,omitempty"` // http, verdict: the answer's status that counts
	Expect    string `json:"expect,omitempty"` // wait: backend ip:port the answer must name; "" any answer
	Base      string `json:"base,omitempty"`   // sweep: first ClusterIP
	N         int    `json:"n,omitempty"`      // sweep: how many consecutive ClusterIPs
	Port      int    `json:"port,omitempty"`
	TimeoutMs int    `json:"timeoutMs,omitempty"`
}

type workerResp struct {
	Err        string  `json:"err,omitempty"`
	P50us      float64 `json:"p50us,omitempty"`
	P99us      float64 `json:"p99us,omitempty"`
	ConnPerSec float64 `json:"connPerSec,omitempty"` // http: requests/s
	Errors     int     `json:"errors,omitempty"`
	Mono       int64   `json:"mono,omitempty"` // wait/sweep: when the condition was met
	Answered   int     `json:"answered,omitempty"`
	RRPerSec   float64 `json:"rrPerSec,omitempty"` // udprr, udpflows: round trips/s
	RRus       float64 `json:"rrUs,omitempty"`     // udprr, udpflows: µs per round trip
	OK         bool    `json:"ok"`
}

// workerOps are the requests a worker answers, by workerReq.Op.
var workerOps = map[string]func(workerReq) workerResp{
	"lat": latency, "wait": wait, "sweep": sweep, // Service table
	"conns": connsOp, "udprr": udpRROp, "udpflows": udpFlowsOp, // policy table
	"http": httpLoadOp, "verdict": verdictOp, // L7 table
}

func runWorker(in io.Reader, out io.Writer) error {
	sc := bufio.NewScanner(in)
	enc := json.NewEncoder(out)
	for sc.Scan() {
		var req workerReq
		if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
			return err
		}
		resp := workerResp{Err: "unknown op " + req.Op}
		if op, ok := workerOps[req.Op]; ok {
			resp = op(req)
		}
		if err := enc.Encode(resp); err != nil {
			return err
		}
	}
	return sc.Err()
}

func sockaddr(s string) (*unix.SockaddrInet4, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return nil, err
	}
	return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}, nil
}

// dial makes one TCP connection the way Go's net package does (non-blocking
// connect, poll, SO_ERROR), optionally reads the server's line, and closes
// with a RST so no TIME_WAIT piles up over hundreds of thousands of
// connections. It returns the connect() time: socket LB translation happens
// inside connect(), kube-proxy's DNAT on the SYN, so both are in it.
func dial(sa *unix.SockaddrInet4, timeout time.Duration, read bool) (time.Duration, string, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, "", err
	}
	defer func() {
		_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
		unix.Close(fd)
	}()
	t0 := time.Now()
	err = unix.Connect(fd, sa)
	if err != nil && err != unix.EINPROGRESS {
		return 0, "", err
	}
	if err == unix.EINPROGRESS {
		if err := pollFd(fd, unix.POLLOUT, timeout); err != nil {
			return 0, "", err
		}
		soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			return 0, "", err
		}
		if soerr != 0 {
			return 0, "", syscall.Errno(soerr)
		}
	}
	d := time.Since(t0)
	if !read {
		return d, "", nil
	}
	if err := pollFd(fd, unix.POLLIN, timeout); err != nil {
		return d, "", err
	}
	buf := make([]byte, 64)
	n, err := unix.Read(fd, buf)
	if err != nil {
		return d, "", err
	}
	return d, strings.TrimSpace(string(buf[:n])), nil
}

func pollFd(fd int, ev int16, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return unix.ETIMEDOUT
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: ev}}
		n, err := unix.Poll(fds, int(left/time.Millisecond)+1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n > 0 {
			return nil
		}
	}
}

func latency(req workerReq) workerResp {
	// Warm the neighbour cache, conntrack and branch predictors alike for
	// every datapath.
	return connectSeries(req, 200, false)
}

// connectSeries dials req.Addr warm times unmeasured, then req.Count times
// one after another: a sample is the connect() or, with read, connect to the
// server's answer.
func connectSeries(req workerReq, warm int, read bool) workerResp {
	sa, err := sockaddr(req.Addr)
	if err != nil {
		return workerResp{Err: err.Error()}
	}
	for range warm {
		_, _, _ = dial(sa, time.Second, read)
	}
	samples := make([]time.Duration, 0, req.Count)
	var errs int
	var firstErr error
	start := time.Now()
	for range req.Count {
		t0 := time.Now()
		d, _, err := dial(sa, time.Second, read)
		if err != nil {
			errs++
			firstErr = err
			continue
		}
		if read {
			d = time.Since(t0)
		}
		samples = append(samples, d)
	}
	return connResp(samples, errs, firstErr, time.Since(start))
}

// wait polls one address until the answer names req.Expect (or anything,
// when Expect is empty), every 200µs.
func wait(req workerReq) workerResp {
	sa, err := sockaddr(req.Addr)
	if err != nil {
		return workerResp{Err: err.Error()}
	}
	deadline := time.Now().Add(time.Duration(req.TimeoutMs) * time.Millisecond)
	var last string
	for time.Now().Before(deadline) {
		_, got, err := dial(sa, 200*time.Millisecond, true)
		if err == nil && (req.Expect == "" || got == req.Expect) {
			return workerResp{OK: true, Mono: monoNow()}
		}
		if err != nil {
			last = err.Error()
		} else {
			last = "answered by " + got
		}
		time.Sleep(200 * time.Microsecond)
	}
	return workerResp{Err: "timeout: last " + last}
}

// sweep connects to N consecutive ClusterIPs, pass after pass over the ones
// that have not answered yet, until all have: Mono is when the last one did.
func sweep(req workerReq) workerResp {
	base, err := netip.ParseAddr(req.Base)
	if err != nil {
		return workerResp{Err: err.Error()}
	}
	pending := make([]*unix.SockaddrInet4, 0, req.N)
	a := base
	for i := 0; i < req.N; i++ {
		pending = append(pending, &unix.SockaddrInet4{Addr: a.As4(), Port: req.Port})
		a = a.Next()
	}
	deadline := time.Now().Add(time.Duration(req.TimeoutMs) * time.Millisecond)
	var mono int64
	answered := 0
	for len(pending) > 0 && time.Now().Before(deadline) {
		left := pending[:0]
		for _, sa := range pending {
			if _, _, err := dial(sa, 100*time.Millisecond, false); err == nil {
				answered++
				mono = monoNow()
			} else {
				left = append(left, sa)
			}
		}
		pending = left
		if len(pending) > 0 {
			// Leave the CPUs to the API server and the controller between
			// passes: on 2 cores a busy sweep would slow what it measures.
			time.Sleep(10 * time.Millisecond)
		}
	}
	if len(pending) > 0 {
		return workerResp{Answered: answered, Err: fmt.Sprintf("%d of %d never answered", len(pending), req.N)}
	}
	return workerResp{OK: true, Answered: answered, Mono: mono}
}

// runAgent is the node agent's service-LB half as a process of its own: the
// real socklb datapath and the real servicelb sync, attached at the test
// cgroup (fd 3) instead of the cgroup root. It detaches on SIGTERM.
func runAgent() error {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	cfg, err := clientcmd.BuildConfigFromFlags("", os.Getenv("KEBPF_BENCH_KUBECONFIG"))
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst = 100, 200
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	objs, err := socklb.Load(os.Getenv("KEBPF_BENCH_PIN_DIR"), socklb.LoadOptions{Logger: log})
	if err != nil {
		return fmt.Errorf("load socklb: %w", err)
	}
	if err := objs.Attach("/proc/self/fd/3"); err != nil {
		objs.Detach()
		return fmt.Errorf("attach socklb: %w", err)
	}
	dp := &swappable{objs: objs}
	syncer, err := servicelb.New(servicelb.Options{Base: apisync.Base{Client: client, NodeName: nodeName, Log: log}, Datapath: dp})
	if err != nil {
		objs.Detach()
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	wctx, wstop := context.WithCancel(ctx)
	watched := make(chan struct{})
	go func() { defer close(watched); watchAttached(wctx, dp, os.Getenv("KEBPF_BENCH_PIN_DIR"), log) }()
	runErr := syncer.Run(ctx)
	wstop()
	<-watched
	if err := dp.objs.Detach(); err != nil {
		return errors.Join(runErr, fmt.Errorf("detach socklb: %w", err))
	}
	return runErr
}

// swappable is the datapath the sync writes, behind a lock so the watchdog
// can reload it. Its Objects index is rebuilt from the pinned maps.
type swappable struct {
	mu   sync.Mutex
	objs *socklb.Objects
}

func (s *swappable) Apply(svc socklb.Service) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.objs.Apply(svc)
}

func (s *swappable) Delete(id uint32) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.objs.Delete(id)
}

func (s *swappable) Capacity() (int, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.objs.Capacity()
}

func (s *swappable) Services() (map[uint32]socklb.Service, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.objs.Services()
}

// watchAttached re-attaches when our links are gone from the test cgroup.
// `kebpf-agent cleanup` force-detaches every kebpf_ link on the kernel, and
// other sessions run it on this shared machine; without this a cleanup
// elsewhere would silently turn socket-LB numbers into timeouts. Reload =
// close our handles (pins stay), load again from the pinned maps, attach.
func watchAttached(ctx context.Context, dp *swappable, pinDir string, log *slog.Logger) {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cg, err := os.Open("/proc/self/fd/3")
		if err != nil {
			continue
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: ebpf.AttachCGroupInet4Connect})
		cg.Close()
		if err != nil || len(res.Programs) > 0 {
			continue
		}
		log.Warn("socket LB links were detached by someone else; re-attaching")
		dp.mu.Lock()
		_ = dp.objs.Close()
		objs, err := socklb.Load(pinDir, socklb.LoadOptions{Logger: log})
		if err == nil {
			if err = objs.Attach("/proc/self/fd/3"); err == nil {
				dp.objs = objs
			}
		}
		dp.mu.Unlock()
		if err != nil {
			log.Error("re-attach socklb", "err", err)
			return
		}
	}
}

// connResp is a connection sample: one latency per answered connection in
// wall, errs failed.
func connResp(samples []time.Duration, errs int, firstErr error, wall time.Duration) workerResp {
	resp := workerResp{Errors: errs, OK: len(samples) > 0}
	if errs > 0 {
		resp.Err = firstErr.Error()
	}
	if len(samples) == 0 {
		return resp
	}
	slices.Sort(samples)
	q := func(p float64) float64 {
		return float64(samples[int(p*float64(len(samples)-1))]) / float64(time.Microsecond)
	}
	resp.P50us, resp.P99us = q(0.50), q(0.99)
	resp.ConnPerSec = float64(len(samples)) / wall.Seconds()
	return resp
}
