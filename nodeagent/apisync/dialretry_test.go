package apisync

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/rest"
)

// A request to a server that is down waits for it and succeeds within an
// interval of its return; a server that answers with an error is not
// retried; a request's context ends the wait.
func TestWaitForAPIServer(t *testing.T) {
	// Reserve a port, then leave it closed: connection refused.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	cfg := &rest.Config{}
	WaitForAPIServer(cfg, 50*time.Millisecond, time.Minute)
	client := &http.Client{Transport: cfg.WrapTransport(http.DefaultTransport.(*http.Transport).Clone())}

	up := 300 * time.Millisecond
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		if r.URL.Path == "/fail" {
			http.Error(w, "no", http.StatusInternalServerError)
			return
		}
		io.WriteString(w, "ok "+string(b))
	})}
	t.Cleanup(func() { srv.Close() })
	go func() {
		time.Sleep(up)
		l, err := net.Listen("tcp", addr)
		if err != nil {
			t.Errorf("listen again on %s: %v", addr, err)
			return
		}
		srv.Serve(l)
	}()

	start := time.Now()
	req, _ := http.NewRequest(http.MethodPost, "http://"+addr+"/x", strings.NewReader("body"))
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("request while the server was down: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "ok body" {
		t.Errorf("reply %q: the body was not sent again", b)
	}
	if took := time.Since(start); took < up {
		t.Errorf("answered after %s, before the server was up (%s)", took, up)
	}

	// An answer, even an error, is returned as is.
	resp, err = client.Get("http://" + addr + "/fail")
	if err != nil || resp.StatusCode != http.StatusInternalServerError {
		t.Errorf("server error: %v %v, want the 500 itself", resp, err)
	}

	// The request's context bounds the wait.
	srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	req, _ = http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/x", nil)
	start = time.Now()
	if _, err := client.Do(req); err == nil {
		t.Error("request to a closed server succeeded")
	} else if took := time.Since(start); took > 2*time.Second {
		t.Errorf("context of 200ms ended the wait only after %s", took)
	}
	var op *net.OpError
	if !dialFailed(&net.OpError{Op: "dial", Err: errors.New("refused")}) || dialFailed(errors.New("EOF")) || errors.As(errors.New("x"), &op) {
		t.Error("dialFailed misclassifies")
	}
}
