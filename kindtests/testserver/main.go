// Command kebpf-testserver is the workload image of the e2e suite, in the
// spirit of agnhost: `serve` answers on TCP, UDP and HTTP ports with the pod's
// name, and `probe` connects to one address and prints one JSON line saying
// who answered or how the attempt failed (refused, timeout, ...), so a test can
// tell "blocked" from "connected to the wrong backend".
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	if filepath.Base(os.Args[0]) == "nslookup" {
		os.Exit(nslookup(os.Args[1:], os.Stdout, os.Stderr))
	}
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "probe":
		os.Exit(probe(os.Args[2:], os.Stdout))
	case "nslookup":
		os.Exit(nslookup(os.Args[2:], os.Stdout, os.Stderr))
	case "-h", "--help", "help":
		usage()
	default:
		fmt.Fprintf(os.Stderr, "error: unknown command %q\n", os.Args[1])
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, `usage:
  kebpf-testserver serve [--tcp 80,81] [--udp 80,81] [--http 8080] [--name NAME]
  kebpf-testserver probe --protocol tcp|udp|http --to HOST:PORT[/path] [--timeout 2s] [--count N --interval D] [--unconnected]
  kebpf-testserver probe --protocol dns --to NAME [--transport udp|tcp] [--unconnected] [--server HOST:PORT]
  kebpf-testserver nslookup NAME   (also as /usr/bin/nslookup NAME): nslookup-style answer through the pod's resolver
`)
	os.Exit(2)
}

// identity is what every server answers: the pod name when the pod spec passes
// it, else the hostname (the pod name too, for a pod that is not hostNetwork).
func identity(flagName string) string {
	if flagName != "" {
		return flagName
	}
	if n := os.Getenv("POD_NAME"); n != "" {
		return n
	}
	h, _ := os.Hostname()
	return h
}

func parsePorts(s string) ([]int, error) {
	var ports []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		p, err := strconv.Atoi(f)
		if err != nil || p < 1 || p > 65535 {
			return nil, fmt.Errorf("bad port %q", f)
		}
		ports = append(ports, p)
	}
	return ports, nil
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	tcp := fs.String("tcp", "80,81", "comma-separated TCP ports")
	udp := fs.String("udp", "80,81", "comma-separated UDP ports")
	httpPort := fs.Int("http", 8080, "HTTP port (0: none)")
	name := fs.String("name", "", "name to answer with (default $POD_NAME or hostname)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	me := identity(*name)
	tcpPorts, err := parsePorts(*tcp)
	if err != nil {
		return err
	}
	udpPorts, err := parsePorts(*udp)
	if err != nil {
		return err
	}
	errc := make(chan error, len(tcpPorts)+len(udpPorts)+1)
	for _, p := range tcpPorts {
		// "tcp" listens on v4 and v6 at once, so dual-stack pods answer on both.
		l, err := net.Listen("tcp", net.JoinHostPort("", strconv.Itoa(p)))
		if err != nil {
			return err
		}
		go func() { errc <- serveTCP(l, me) }()
	}
	for _, p := range udpPorts {
		c, err := net.ListenPacket("udp", net.JoinHostPort("", strconv.Itoa(p)))
		if err != nil {
			return err
		}
		go func() { errc <- serveUDP(c, me) }()
	}
	if *httpPort > 0 {
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
		mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, me+"\n") })
		srv := &http.Server{Addr: net.JoinHostPort("", strconv.Itoa(*httpPort)), Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { errc <- srv.ListenAndServe() }()
	}
	fmt.Printf("serving as %s: tcp %v udp %v http %d\n", me, tcpPorts, udpPorts, *httpPort)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case s := <-sig:
		fmt.Println("exiting on", s)
		return nil
	case err := <-errc:
		return err
	}
}

// serveTCP writes the identity and closes: the client reads until EOF, so a
// connection that is accepted by the wrong pod is visible in the reply.
func serveTCP(l net.Listener, me string) error {
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			io.WriteString(c, me+"\n")
		}()
	}
}

func serveUDP(c net.PacketConn, me string) error {
	buf := make([]byte, 2048)
	for {
		_, from, err := c.ReadFrom(buf)
		if err != nil {
			return err
		}
		c.WriteTo([]byte(me+"\n"), from)
	}
}

// Result is the one JSON line probe prints.
type Result struct {
	OK       bool   `json:"ok"`
	Reply    string `json:"reply,omitempty"`
	Error    string `json:"error,omitempty"`
	Class    string `json:"class,omitempty"`  // refused, timeout, unreachable, denied, http, other
	Status   int    `json:"status,omitempty"` // http: the response status
	Peer     string `json:"peer,omitempty"`   // getpeername() of the connected socket; dns: the answers' sources
	Server   string `json:"server,omitempty"` // dns: the nameserver(s) asked
	Target   string `json:"target,omitempty"`
	Duration string `json:"duration"`
}

func probe(args []string, out io.Writer) int {
	fs := flag.NewFlagSet("probe", flag.ContinueOnError)
	proto := fs.String("protocol", "tcp", "tcp, udp, http or dns")
	to := fs.String("to", "", "HOST:PORT to probe (dns: the name to look up); a comma-separated list probes every target at once (one JSON line each, in list order)")
	timeout := fs.Duration("timeout", 2*time.Second, "give up on one attempt after this long")
	unconnected := fs.Bool("unconnected", false, "udp, dns over udp: sendto/recvfrom on an unconnected socket (as DNS clients do); peer is the reply's source")
	transport := fs.String("transport", "udp", "dns: udp or tcp")
	server := fs.String("server", "", "dns: HOST:PORT of the nameserver (default: /etc/resolv.conf's)")
	count := fs.Int("count", 1, "attempts, each a new socket, one JSON line each")
	interval := fs.Duration("interval", 0, "pause between attempts")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *to == "" || *count < 1 {
		fmt.Fprintln(os.Stderr, "error: --to is required and --count must be at least 1")
		return 2
	}
	switch *proto {
	case "tcp", "udp", "http":
	case "dns":
		if *transport != "udp" && *transport != "tcp" {
			fmt.Fprintf(os.Stderr, "error: unknown dns transport %q\n", *transport)
			return 2
		}
	default:
		fmt.Fprintf(os.Stderr, "error: unknown protocol %q\n", *proto)
		return 2
	}
	failed := 0
	enc := json.NewEncoder(out)
	for i := 0; i < *count; i++ {
		if i > 0 && *interval > 0 {
			time.Sleep(*interval)
		}
		targets := strings.Split(*to, ",")
		results := make([]Result, len(targets))
		var wg sync.WaitGroup
		// Concurrently: a matrix probe of denied targets then costs one
		// timeout, not one per target.
		for j, target := range targets {
			wg.Add(1)
			go func() {
				defer wg.Done()
				results[j] = attempt(attemptOpts{proto: *proto, to: strings.TrimSpace(target), timeout: *timeout, unconnected: *unconnected, transport: *transport, server: *server})
				results[j].Target = strings.TrimSpace(target)
			}()
		}
		wg.Wait()
		for _, r := range results {
			if !r.OK {
				failed++
			}
			enc.Encode(r)
		}
	}
	if failed > 0 {
		return 1
	}
	return 0
}

type attemptOpts struct {
	proto, to         string
	timeout           time.Duration
	unconnected       bool
	transport, server string // dns
}

// attempt is one probe on a new socket.
func attempt(o attemptOpts) Result {
	proto, to, unconnected := o.proto, o.to, o.unconnected
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	var r Result
	var err error
	switch {
	case proto == "dns":
		r, err = probeDNS(ctx, to, o.transport, o.server, unconnected)
	case proto == "tcp":
		r, err = probeStream(ctx, "tcp", to)
	case proto == "udp" && unconnected:
		r, err = probeUDPUnconnected(ctx, to)
	case proto == "udp":
		r, err = probeUDP(ctx, to)
	default:
		r, err = probeHTTP(ctx, to)
	}
	if err != nil {
		r.Error, r.Class = err.Error(), classify(err)
	} else {
		r.OK = true
	}
	r.Duration = time.Since(start).Round(time.Microsecond).String()
	return r
}

// dialProbe connects to to, bounded by ctx's deadline; the result names
// the peer the socket reports (getpeername()).
func dialProbe(ctx context.Context, network, to string) (net.Conn, Result, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, to)
	if err != nil {
		return nil, Result{}, err
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	return c, Result{Peer: c.RemoteAddr().String()}, nil
}

func probeStream(ctx context.Context, network, to string) (Result, error) {
	c, r, err := dialProbe(ctx, network, to)
	if err != nil {
		return r, err
	}
	defer c.Close()
	line, err := bufio.NewReader(c).ReadString('\n')
	r.Reply = strings.TrimSpace(line)
	if err != nil && r.Reply == "" {
		return r, err
	}
	return r, nil
}

// probeUDP uses a connected UDP socket, so ICMP errors (port unreachable) and
// a socket-LB refusal surface as errors instead of a silent timeout.
func probeUDP(ctx context.Context, to string) (Result, error) {
	c, r, err := dialProbe(ctx, "udp", to)
	if err != nil {
		return r, err
	}
	defer c.Close()
	buf := make([]byte, 2048)
	err = resendUntilAnswer(ctx, c, func() error {
		_, err := c.Write([]byte("probe\n"))
		return err
	}, func() error {
		n, err := c.Read(buf)
		if err == nil {
			r.Reply = strings.TrimSpace(string(buf[:n]))
		}
		return err
	})
	return r, err
}

// resendUntilAnswer sends and waits 300 ms for the answer, again and again
// until one comes, a read fails other than by timing out, or ctx ends:
// the first datagram may race an ARP resolution.
func resendUntilAnswer(ctx context.Context, c net.Conn, send, recv func() error) error {
	for {
		if err := send(); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		err := recv()
		if err == nil {
			return nil
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// probeUDPUnconnected sends with sendto() and reports the source address of
// the reply from recvfrom(): a socket LB must make it the address the client
// sent to, or resolvers drop the answer.
func probeUDPUnconnected(ctx context.Context, to string) (Result, error) {
	dst, err := net.ResolveUDPAddr("udp", to)
	if err != nil {
		return Result{}, err
	}
	network := "udp4"
	if dst.IP.To4() == nil {
		network = "udp6"
	}
	c, err := net.ListenUDP(network, nil)
	if err != nil {
		return Result{}, err
	}
	defer c.Close()
	var r Result
	buf := make([]byte, 2048)
	err = resendUntilAnswer(ctx, c, func() error {
		_, err := c.WriteToUDP([]byte("probe\n"), dst)
		return err
	}, func() error {
		n, from, err := c.ReadFromUDP(buf)
		if err == nil {
			r.Reply, r.Peer = strings.TrimSpace(string(buf[:n])), from.String()
		}
		return err
	})
	return r, err
}

// errHTTPStatus marks a response that came but was not 200 (class "http").
var errHTTPStatus = errors.New("http status")

// probeHTTP GETs to, HOST:PORT with an optional /path ("/" by default), on
// a new connection, and reports the status and the body's first line(s).
func probeHTTP(ctx context.Context, to string) (Result, error) {
	hostPort, path := to, "/"
	if i := strings.Index(to, "/"); i >= 0 {
		hostPort, path = to[:i], to[i:]
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+hostPort+path, nil)
	if err != nil {
		return Result{}, err
	}
	var peer string
	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err == nil {
			peer = c.RemoteAddr().String()
		}
		return c, err
	}}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return Result{Peer: peer}, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	r := Result{Reply: strings.TrimSpace(string(body)), Status: resp.StatusCode, Peer: peer}
	if resp.StatusCode != http.StatusOK {
		return r, fmt.Errorf("%w %d", errHTTPStatus, resp.StatusCode)
	}
	return r, nil
}

func classify(err error) string {
	var de *net.DNSError
	if errors.As(err, &de) && de.IsNotFound {
		return "notfound"
	}
	switch {
	case errors.Is(err, errHTTPStatus):
		return "http"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded):
		return "timeout"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return "unreachable"
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EACCES):
		return "denied"
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	return "other"
}
