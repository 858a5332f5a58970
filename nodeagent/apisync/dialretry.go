package apisync

import (
	"errors"
	"net"
	"net/http"
	"time"

	"k8s.io/client-go/rest"
)

// WaitForAPIServer makes every request of clients built from cfg wait for an
// API server it cannot reach (connection refused, no route, dial timeout:
// the server is down or partitioned away), retrying the dial every interval
// for up to max, instead of failing at once.
//
// Why: client-go's reflectors back off after each failed list, up to 30 s
// jittered to 60 s, so after an outage of a minute or more an agent would
// see the changes made meanwhile only up to a minute after the server is
// back (measured: 35-65 s in TestIntegrationReliability). A list that
// waits for the server instead returns within interval of its return. Only
// requests that never reached the server are retried (the dial failed, no
// byte was sent), so any verb is safe; the request's context still bounds
// the wait (callers with a deadline keep it).
func WaitForAPIServer(cfg *rest.Config, interval, max time.Duration) {
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return &dialRetry{rt: rt, interval: interval, max: max}
	})
}

type dialRetry struct {
	rt            http.RoundTripper
	interval, max time.Duration
}

func (d *dialRetry) RoundTrip(req *http.Request) (*http.Response, error) {
	deadline := time.Now().Add(d.max)
	for {
		resp, err := d.rt.RoundTrip(req)
		if err == nil || !dialFailed(err) || time.Now().After(deadline) {
			return resp, err
		}
		if req.Body != nil && req.Body != http.NoBody {
			if req.GetBody == nil {
				return resp, err // a body we cannot send again
			}
			body, berr := req.GetBody()
			if berr != nil {
				return resp, err
			}
			req = req.Clone(req.Context())
			req.Body = body
		}
		select {
		case <-req.Context().Done():
			return nil, err
		case <-time.After(d.interval):
		}
	}
}

// dialFailed reports whether err is a failure to connect: the request was
// never sent.
func dialFailed(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}
