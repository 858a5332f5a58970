//go:build linux

package l7

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
)

// payloadPod answers /sum with the SHA-256 of the request body, /blob?n=N
// with N deterministic bytes streamed in 64 KiB chunks (chunked encoding,
// no Content-Length), and anything else with its path.
func payloadPod() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/public/sum":
			h := sha256.New()
			n, err := io.Copy(h, r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			fmt.Fprintf(w, "%d %s", n, hex.EncodeToString(h.Sum(nil)))
		case "/public/blob":
			n, _ := strconv.Atoi(r.URL.Query().Get("n"))
			src := blob(7)
			buf := make([]byte, 64<<10)
			for n > 0 {
				k := min(n, len(buf))
				src.Read(buf[:k])
				w.Write(buf[:k])
				n -= k
			}
		default:
			io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "pod %s", r.URL.Path)
		}
	})
}

// blob is a deterministic byte stream.
func blob(seed uint64) io.Reader { return rand.NewChaCha8([32]byte{byte(seed)}) }

func sumOf(r io.Reader, n int64) string {
	h := sha256.New()
	io.CopyN(h, r, n)
	return hex.EncodeToString(h.Sum(nil))
}

// onlyReader hides everything but Read, so the client cannot learn the
// length and sends the body chunked.
type onlyReader struct{ io.Reader }

// TestIntegrationL7Payloads pushes real HTTP traffic through the whole path
// (connect steering, SO_ORIGINAL_DST, sk_msg both ways between the client
// and a real Envoy, Envoy's upstream to the pod) and checks that what
// arrives is what was sent: 16 MiB chunked uploads and downloads, keep-alive,
// pipelining, a half-closed client, and HTTP/2 (h2c) streams in parallel.
// These are the shapes the kernel 6.18 sockmap read-wakeup/FIONREAD
// regression (L7-FACTS.md) stalled elsewhere; every read here has a deadline.
func TestIntegrationL7Payloads(t *testing.T) {
	p := startPath(t, payloadPod(), func(pod netip.AddrPort) xds.Input { return Input(pod, "n1", "/public/") })
	const big = 16 << 20
	before := p.stats(t)

	t.Run("16 MiB chunked upload", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodPost, p.url("/public/sum"), onlyReader{io.LimitReader(blob(1), big)})
		// POST is not allowed by the policy (GET, HEAD): 403 after Envoy
		// read the request; the body still crossed sk_msg into Envoy.
		resp, err := p.client(t, false, false).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("POST: %d, want 403 (policy allows GET and HEAD only)", resp.StatusCode)
		}
		// A GET with a body is allowed: the pod must see every byte.
		req, _ = http.NewRequest(http.MethodGet, p.url("/public/sum"), onlyReader{io.LimitReader(blob(1), big)})
		resp, err = p.client(t, false, false).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := fmt.Sprintf("%d %s", big, sumOf(blob(1), big)); resp.StatusCode != 200 || string(got) != want {
			t.Errorf("upload: %d %q, want 200 %q", resp.StatusCode, got, want)
		}
	})

	t.Run("16 MiB chunked download", func(t *testing.T) {
		resp, err := p.client(t, false, false).Get(p.url("/public/blob?n=" + strconv.Itoa(big)))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.ContentLength != -1 {
			t.Logf("response length %d (Envoy may re-frame)", resp.ContentLength)
		}
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		if err != nil || n != big || hex.EncodeToString(h.Sum(nil)) != sumOf(blob(7), big) {
			t.Errorf("download: %d bytes, err %v, checksum match %v", n, err, hex.EncodeToString(h.Sum(nil)) == sumOf(blob(7), big))
		}
	})

	t.Run("keep-alive: 200 requests, one connection", func(t *testing.T) {
		s0 := p.stats(t)
		c := p.client(t, true, false)
		for i := range 200 {
			resp, err := c.Get(p.url(fmt.Sprintf("/public/k/%d", i)))
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(b) != fmt.Sprintf("pod /public/k/%d", i) {
				t.Fatalf("request %d: %q", i, b)
			}
		}
		c.CloseIdleConnections()
		if s := p.stats(t); s.Steered-s0.Steered != 1 {
			t.Errorf("%d connections steered for 200 keep-alive requests, want 1", s.Steered-s0.Steered)
		}
	})

	t.Run("pipelining: 50 requests in one write", func(t *testing.T) {
		conn, err := p.dial(t, t.Context())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		var reqs strings.Builder
		for i := range 50 {
			fmt.Fprintf(&reqs, "GET /public/p/%d HTTP/1.1\r\nHost: pod\r\n\r\n", i)
		}
		if _, err := io.WriteString(conn, reqs.String()); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(conn)
		for i := range 50 {
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("response %d: %v", i, err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(b) != fmt.Sprintf("pod /public/p/%d", i) {
				t.Fatalf("response %d out of order or wrong: %q", i, b)
			}
		}
	})

	t.Run("half-close: the same outcome as plain TCP to Envoy", func(t *testing.T) {
		// Envoy 1.40 closes an HTTP/1 downstream that half-closes before its
		// response (envoyproxy/envoy#2066, #17160), so the client sees EOF
		// on plain TCP too. What the datapath owes is the same outcome, at
		// once: no stall (the FIN must not overtake redirected data, nor be
		// lost), no different answer. bpf/sockmap's TestPayload proves the
		// socket-level half-close (a reply after the FIN) through sk_msg.
		halfClose := func(conn net.Conn) string {
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			fmt.Fprintf(conn, "GET /public/blob?n=%d HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n", 1<<20)
			if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
				return "closewrite: " + err.Error()
			}
			_, err := http.ReadResponse(bufio.NewReader(conn), nil)
			var ne net.Error
			switch {
			case errors.As(err, &ne) && ne.Timeout():
				return "stalled"
			case err != nil:
				return "closed without a response (" + err.Error() + ")"
			}
			return "answered"
		}
		// Plain: straight to Envoy's listener from an unsteered socket
		// (no SO_ORIGINAL_DST: the default chain would answer 403).
		plainConn, err := net.Dial("tcp", p.listen.String())
		if err != nil {
			t.Fatal(err)
		}
		plain := halfClose(plainConn)
		conn, err := p.dial(t, t.Context())
		if err != nil {
			t.Fatal(err)
		}
		steered := halfClose(conn)
		t.Logf("half-closed client: plain TCP to Envoy: %s; steered with sk_msg: %s", plain, steered)
		if steered != plain || steered == "stalled" {
			t.Errorf("half-closed client: steered %q, plain TCP %q: want the same, and no stall", steered, plain)
		}
	})

	t.Run("h2c: 16 streams of 1 MiB each way on one connection", func(t *testing.T) {
		c := p.client(t, true, true)
		var wg sync.WaitGroup
		errs := make(chan error, 32)
		for i := range 16 {
			wg.Go(func() {
				const n = 1 << 20
				req, _ := http.NewRequest(http.MethodGet, p.url("/public/sum"), onlyReader{io.LimitReader(blob(uint64(100+i)), n)})
				resp, err := c.Do(req)
				if err != nil {
					errs <- err
					return
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.ProtoMajor != 2 {
					errs <- fmt.Errorf("stream %d spoke %s, want HTTP/2", i, resp.Proto)
				}
				if want := fmt.Sprintf("%d %s", n, sumOf(blob(uint64(100+i)), n)); string(b) != want {
					errs <- fmt.Errorf("stream %d: %q, want %q", i, b, want)
				}
				resp, err = c.Get(p.url("/public/blob?n=" + strconv.Itoa(n)))
				if err != nil {
					errs <- err
					return
				}
				got := sumOf(resp.Body, n+1)
				resp.Body.Close()
				if got != sumOf(blob(7), n) {
					errs <- fmt.Errorf("stream %d: download differs", i)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		c.CloseIdleConnections()
	})

	after := p.stats(t)
	t.Logf("datapath stats over the payload tests: steered %d, SO_ORIGINAL_DST %d, redirects %d, redirect misses %d, Envoy upstream left alone %d",
		after.Steered-before.Steered, after.OrigDst-before.OrigDst, after.Redirected-before.Redirected,
		after.RedirectMiss-before.RedirectMiss, after.EnvoySkipped-before.EnvoySkipped)
	if after.Redirected-before.Redirected < 1000 {
		t.Errorf("only %d sk_msg redirects for >64 MiB of traffic: payload did not take sk_msg", after.Redirected-before.Redirected)
	}
	if after.RedirectMiss != before.RedirectMiss {
		t.Errorf("%d sk_msg redirect misses: payload went through TCP", after.RedirectMiss-before.RedirectMiss)
	}
	if after.EnvoySkipped == before.EnvoySkipped {
		t.Error("Envoy's upstream connections were never seen left alone")
	}
}
