//go:build linux

package sockmap

import (
	"io"
	"net"
	"testing"
	"time"
)

// BenchmarkPingPong compares a request/response round trip (1 KiB each
// way) and a one-way bulk stream between a steered client and the Envoy
// stand-in (payload through sk_msg) with the same pair over plain loopback
// TCP. Not a timed test: run with -bench under the root lock.
func BenchmarkPingPong(b *testing.B) {
	r := newRig(b)
	pairs := map[string]func() (net.Conn, net.Conn){
		"sk_msg": func() (net.Conn, net.Conn) {
			c, err := dialFrom(b, r.app, r.podAddr)
			if err != nil {
				b.Fatal(err)
			}
			return c, accept(b, r.envoyLn)
		},
		"loopback-tcp": func() (net.Conn, net.Conn) {
			c, err := net.Dial("tcp4", r.envoyAdr.String())
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { c.Close() })
			return c, accept(b, r.envoyLn)
		},
	}
	for _, name := range []string{"loopback-tcp", "sk_msg"} {
		b.Run("rr-1KiB/"+name, func(b *testing.B) {
			c, s := pairs[name]()
			go func() { // echo
				buf := make([]byte, 1024)
				for {
					if _, err := io.ReadFull(s, buf); err != nil {
						return
					}
					if _, err := s.Write(buf); err != nil {
						return
					}
				}
			}()
			req, resp := make([]byte, 1024), make([]byte, 1024)
			c.SetDeadline(time.Now().Add(time.Minute))
			b.SetBytes(2048)
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(req); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, resp); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			c.Close()
			s.Close()
		})
		b.Run("stream-64KiB/"+name, func(b *testing.B) {
			c, s := pairs[name]()
			done := make(chan error, 1)
			go func() { _, err := io.Copy(io.Discard, s); done <- err }()
			buf := make([]byte, 64<<10)
			c.SetDeadline(time.Now().Add(time.Minute))
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			c.(*net.TCPConn).CloseWrite()
			if err := <-done; err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			c.Close()
			s.Close()
		})
	}
	st, err := r.o.Stats()
	if err != nil {
		b.Fatal(err)
	}
	if st.Redirected == 0 {
		b.Fatalf("stats %+v: the sk_msg rows did not use sk_msg", st)
	}
}
