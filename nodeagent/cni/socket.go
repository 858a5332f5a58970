package cni

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// The plugin and the agent speak JSON over HTTP on a unix socket: the
// socket file's mode (0600, root) is the authentication.

// AgentError is the agent refusing a request (it answered, with a reason),
// as opposed to not answering at all.
type AgentError struct {
	Status int
	Msg    string
}

func (e *AgentError) Error() string { return fmt.Sprintf("agent: %d: %s", e.Status, e.Msg) }

// Client calls the agent.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client of the agent serving at socket.
func NewClient(socket string) *Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}
	return &Client{socket: socket, http: &http.Client{Transport: tr}}
}

// Add asks the agent to program a pod and waits for it.
func (c *Client) Add(ctx context.Context, req AddRequest) (AddResponse, error) {
	var resp AddResponse
	err := c.call(ctx, pathAdd, req, &resp)
	return resp, err
}

// Del tells the agent a sandbox is gone.
func (c *Client) Del(ctx context.Context, req DelRequest) error {
	return c.call(ctx, pathDel, req, nil)
}

func (c *Client) call(ctx context.Context, path string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://kebpf-agent"+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	hreq.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(hreq)
	if err != nil {
		return fmt.Errorf("call agent at %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("read agent answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return &AgentError{Status: resp.StatusCode, Msg: strings.TrimSpace(string(b))}
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("parse agent answer: %w", err)
		}
	}
	return nil
}

// Admitter is the agent side: it programs pods the plugin announces.
type Admitter interface {
	// Admit returns once the pod's endpoint is programmed and attached, or
	// with the reason it cannot be (the sandbox then fails and is retried).
	Admit(ctx context.Context, req AddRequest) (AddResponse, error)
	// Release forgets what Admit learnt of a sandbox.
	Release(req DelRequest)
}

// Decision is one ADD the agent answered, for the agent's trace: the
// sandbox was held from the request's arrival until the answer.
type Decision struct {
	Request AddRequest
	// Response is what the plugin was told when the sandbox was admitted.
	Response AddResponse
	// Err is why it was refused; nil: admitted.
	Err error
	// Reason is a short machine-readable reason of a refusal (RefusalReason).
	Reason string
	// Held is how long the sandbox waited for the agent's answer.
	Held time.Duration
}

// Refusal is an Admit error that carries a short machine-readable reason
// (for `kubectl ebpf trace --type cni`); the plugin still sees the text.
type Refusal struct {
	Reason string
	Err    error
}

func (r *Refusal) Error() string       { return r.Err.Error() }
func (r *Refusal) Unwrap() error       { return r.Err }
func (r *Refusal) AdmitReason() string { return r.Reason }

// Refuse wraps err with a machine-readable reason.
func Refuse(reason string, err error) error { return &Refusal{Reason: reason, Err: err} }

// RefusalReason is the machine-readable reason of an Admit error: that of
// the first error in its chain with an AdmitReason method (Refusal, or the
// policy sync's own errors, which need not import this package), else
// "canceled" when the plugin gave up waiting, else "refused".
func RefusalReason(err error) string {
	var r interface{ AdmitReason() string }
	if errors.As(err, &r) && r.AdmitReason() != "" {
		return r.AdmitReason()
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return "canceled"
	}
	return "refused"
}

// Handler serves the plugin's requests. decided, when not nil, is told
// every ADD's outcome once it is answered (the agent's trace).
func Handler(a Admitter, log *slog.Logger, decided func(Decision)) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+pathAdd, func(w http.ResponseWriter, r *http.Request) {
		var req AddRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
			http.Error(w, "bad request: "+err.Error(), http.StatusBadRequest)
			return
		}
		start := time.Now()
		resp, err := a.Admit(r.Context(), req)
		d := Decision{Request: req, Response: resp, Err: err, Held: time.Since(start)}
		if err != nil {
			d.Reason = RefusalReason(err)
			log.Warn("cni add refused", "pod", req.Namespace+"/"+req.Name, "reason", d.Reason, "err", err)
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
		} else {
			log.Info("cni add", "pod", req.Namespace+"/"+req.Name, "ips", req.IPs, "enforced", resp.Enforced,
				"endpoint", resp.Endpoint, "took", d.Held)
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(resp)
		}
		// decided must not block (the trace hub's Publish does not).
		if decided != nil {
			decided(d)
		}
	})
	mux.HandleFunc("POST "+pathDel, func(w http.ResponseWriter, r *http.Request) {
		var req DelRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
			http.Error(w, "bad request: "+err.Error(), http.StatusBadRequest)
			return
		}
		a.Release(req)
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte("{}"))
	})
	return mux
}

// Listen opens the unix socket at path, replacing a stale one from an
// earlier agent, readable and writable by root only.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("cni socket dir: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale cni socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return ln, nil
}
