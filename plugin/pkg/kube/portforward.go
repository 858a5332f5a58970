package kube

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/transport/spdy"
)

// portForwardProtocol is client-go's tools/portforward.PortForwardProtocolV1Name
// (that package would pull in a websocket library for its listener mode).
const portForwardProtocol = "portforward.k8s.io"

// PortForward is one port-forward connection to a pod through the API
// server (pods/portforward, SPDY), as `kubectl port-forward` makes, but
// without a local listener: every TCP connection the HTTP client opens is a
// new stream pair on the one upgraded connection. Nothing is opened on the
// node's network or on this machine.
type PortForward struct {
	conn   httpstream.Connection
	port   int
	nextID atomic.Int64
	pod    string
}

// DialPortForward opens the port-forward connection to namespace/pod. The
// API server checks the user's own RBAC: create on pods/portforward.
func DialPortForward(ctx context.Context, cfg *rest.Config, namespace, pod string, port int) (*PortForward, error) {
	if cfg == nil {
		return nil, fmt.Errorf("port-forward to %s/%s: no REST config", namespace, pod)
	}
	rt, upgrader, err := spdy.RoundTripperFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("port-forward to %s/%s: %w", namespace, pod, err)
	}
	u, err := urlFor(cfg, namespace, pod)
	if err != nil {
		return nil, err
	}
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, http.MethodPost, u)
	type res struct {
		c   httpstream.Connection
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, _, err := dialer.Dial(portForwardProtocol)
		ch <- res{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("port-forward to %s/%s: %w", namespace, pod, r.err)
		}
		return &PortForward{conn: r.c, port: port, pod: namespace + "/" + pod}, nil
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.c != nil {
				r.c.Close()
			}
		}()
		return nil, fmt.Errorf("port-forward to %s/%s: %w", namespace, pod, ctx.Err())
	}
}

func urlFor(cfg *rest.Config, namespace, pod string) (*url.URL, error) {
	host := cfg.Host
	if !strings.Contains(host, "://") {
		host = "https://" + host
	}
	u, err := url.Parse(host)
	if err != nil {
		return nil, fmt.Errorf("API server URL %q: %w", cfg.Host, err)
	}
	u.Path = strings.TrimSuffix(u.Path, "/") + fmt.Sprintf("/api/v1/namespaces/%s/pods/%s/portforward", namespace, pod)
	return u, nil
}

// Close ends the connection and every stream on it.
func (p *PortForward) Close() error { return p.conn.Close() }

// Closed is closed when the connection ends (the pod went away, the API
// server closed it).
func (p *PortForward) Closed() <-chan bool { return p.conn.CloseChan() }

// HTTPClient is an HTTP client whose every connection is a stream to the
// pod's port (the host part of the URL is ignored). No timeout: trace
// streams are long; callers bound requests with their context.
func (p *PortForward) HTTPClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return p.Dial(ctx) },
		// One stream pair per request: connections are cheap here and a
		// kept-alive stream outliving its request helps nothing.
		DisableKeepAlives: true,
	}}
}

// Dial opens one TCP connection to the pod's port: an error stream and a
// data stream, as the kubelet's port-forward protocol wants.
func (p *PortForward) Dial(ctx context.Context) (net.Conn, error) {
	id := strconv.FormatInt(p.nextID.Add(1), 10)
	h := http.Header{}
	h.Set(corev1.StreamType, corev1.StreamTypeError)
	h.Set(corev1.PortHeader, strconv.Itoa(p.port))
	h.Set(corev1.PortForwardRequestIDHeader, id)
	errStream, err := p.conn.CreateStream(h)
	if err != nil {
		return nil, fmt.Errorf("port-forward to %s: error stream: %w", p.pod, err)
	}
	// We never write to the error stream.
	errStream.Close()
	h.Set(corev1.StreamType, corev1.StreamTypeData)
	data, err := p.conn.CreateStream(h)
	if err != nil {
		p.conn.RemoveStreams(errStream)
		return nil, fmt.Errorf("port-forward to %s: data stream: %w", p.pod, err)
	}
	c := &streamConn{pf: p, data: data, errStream: errStream, errDone: make(chan struct{})}
	go func() {
		// The kubelet writes here when it cannot connect to the port (or
		// the connection failed); the data stream then just ends, so keep
		// the message for the reader.
		msg, _ := io.ReadAll(errStream)
		if m := strings.TrimSpace(string(msg)); m != "" {
			c.mu.Lock()
			c.remoteErr = fmt.Errorf("port-forward to %s port %d: %s", p.pod, p.port, m)
			c.mu.Unlock()
			data.Reset()
		}
		close(c.errDone)
	}()
	return c, nil
}

// streamConn is a net.Conn over a port-forward data stream.
type streamConn struct {
	pf        *PortForward
	data      httpstream.Stream
	errStream httpstream.Stream
	errDone   chan struct{}
	closeOnce sync.Once

	mu        sync.Mutex
	remoteErr error
}

func (c *streamConn) Read(b []byte) (int, error) {
	n, err := c.data.Read(b)
	if err != nil {
		// The error stream's message, if one comes, says why the stream
		// ended; wait briefly for it.
		select {
		case <-c.errDone:
		case <-time.After(100 * time.Millisecond):
		}
		c.mu.Lock()
		if c.remoteErr != nil {
			err = c.remoteErr
		}
		c.mu.Unlock()
	}
	return n, err
}

func (c *streamConn) Write(b []byte) (int, error) { return c.data.Write(b) }

func (c *streamConn) Close() error {
	c.closeOnce.Do(func() {
		c.data.Reset()
		c.pf.conn.RemoveStreams(c.data, c.errStream)
	})
	return nil
}

type pfAddr string

func (a pfAddr) Network() string { return "portforward" }
func (a pfAddr) String() string  { return string(a) }

func (c *streamConn) LocalAddr() net.Addr  { return pfAddr("local") }
func (c *streamConn) RemoteAddr() net.Addr { return pfAddr(c.pf.pod + ":" + strconv.Itoa(c.pf.port)) }

// Deadlines are not supported by the streams; HTTP requests are bounded by
// their context instead.
func (c *streamConn) SetDeadline(time.Time) error      { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }
