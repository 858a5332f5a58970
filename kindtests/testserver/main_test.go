package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"testing"
)

// probeOnce runs the probe command and decodes its JSON line.
func probeOnce(t *testing.T, args ...string) (Result, int) {
	t.Helper()
	var out bytes.Buffer
	code := probe(args, &out)
	var r Result
	if err := json.Unmarshal(bytes.TrimSpace(out.Bytes()), &r); err != nil {
		t.Fatalf("probe printed no JSON: %v: %q", err, out.String())
	}
	return r, code
}

// serverTCP serves identity name on a loopback port until the test ends
// and returns its address.
func serverTCP(t *testing.T, name string) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go serveTCP(l, name)
	return l.Addr().String()
}

// closedAddr is a loopback port nobody listens on (bound, then closed), so
// the kernel refuses it.
func closedAddr(t *testing.T, network string) string {
	t.Helper()
	var c io.Closer
	var addr net.Addr
	if network == "tcp" {
		l, err := net.Listen(network, "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		c, addr = l, l.Addr()
	} else {
		pc, err := net.ListenPacket(network, "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		c, addr = pc, pc.LocalAddr()
	}
	c.Close()
	return addr.String()
}

func TestProbe(t *testing.T) {
	tcpAddr := serverTCP(t, "pod-a")
	uc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { uc.Close() })
	go serveUDP(uc, "pod-u")
	closedTCP, closedUDP := closedAddr(t, "tcp"), closedAddr(t, "udp")

	for _, tc := range []struct {
		name      string
		args      []string
		wantOK    bool
		wantReply string
		wantClass string
	}{
		{"tcp answers with identity", []string{"--protocol", "tcp", "--to", tcpAddr}, true, "pod-a", ""},
		{"udp answers with identity", []string{"--protocol", "udp", "--to", uc.LocalAddr().String()}, true, "pod-u", ""},
		{"unconnected udp answers", []string{"--protocol", "udp", "--unconnected", "--to", uc.LocalAddr().String()}, true, "pod-u", ""},
		{"tcp refused", []string{"--protocol", "tcp", "--to", closedTCP}, false, "", "refused"},
		{"udp refused by ICMP", []string{"--protocol", "udp", "--to", closedUDP, "--timeout", "1s"}, false, "", "refused"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, code := probeOnce(t, tc.args...)
			if r.OK != tc.wantOK || r.Reply != tc.wantReply || r.Class != tc.wantClass || (code == 0) != tc.wantOK {
				t.Errorf("got %+v (exit %d), want ok=%v reply=%q class=%q", r, code, tc.wantOK, tc.wantReply, tc.wantClass)
			}
		})
	}
}

func TestParsePorts(t *testing.T) {
	if p, err := parsePorts("80, 81,"); err != nil || len(p) != 2 || p[0] != 80 || p[1] != 81 {
		t.Errorf("parsePorts: %v %v", p, err)
	}
	for _, bad := range []string{"0", "65536", "x"} {
		if _, err := parsePorts(bad); err == nil {
			t.Errorf("parsePorts(%q) accepted", bad)
		}
	}
}

func TestProbeCount(t *testing.T) {
	var out bytes.Buffer
	if code := probe([]string{"--to", serverTCP(t, "pod-a"), "--count", "3"}, &out); code != 0 {
		t.Fatalf("exit %d: %s", code, out.String())
	}
	if n := bytes.Count(out.Bytes(), []byte("\n")); n != 3 {
		t.Errorf("want 3 JSON lines, got %d: %s", n, out.String())
	}
}

func TestProbeManyTargets(t *testing.T) {
	a, closed := serverTCP(t, "pod-a"), closedAddr(t, "tcp")
	var out bytes.Buffer
	probe([]string{"--to", a + "," + closed}, &out)
	lines := bytes.Split(bytes.TrimSpace(out.Bytes()), []byte("\n"))
	if len(lines) != 2 {
		t.Fatalf("want 2 lines, got %q", out.String())
	}
	var r0, r1 Result
	json.Unmarshal(lines[0], &r0)
	json.Unmarshal(lines[1], &r1)
	if !r0.OK || r0.Target != a || r1.OK || r1.Class != "refused" || r1.Target != closed {
		t.Errorf("results out of order or wrong: %+v %+v", r0, r1)
	}
}

func TestProbeHTTPPathAndStatus(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/private" {
			http.Error(w, "RBAC: access denied", http.StatusForbidden)
			return
		}
		io.WriteString(w, "api "+r.URL.Path+"\n")
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	addr := l.Addr().String()

	r, code := probeOnce(t, "--protocol", "http", "--to", addr+"/public/x")
	if !r.OK || code != 0 || r.Status != 200 || r.Reply != "api /public/x" || r.Peer != addr {
		t.Errorf("allowed: %+v exit %d", r, code)
	}
	r, code = probeOnce(t, "--protocol", "http", "--to", addr+"/private")
	if r.OK || code == 0 || r.Status != 403 || r.Class != "http" || r.Reply != "RBAC: access denied" {
		t.Errorf("denied: %+v exit %d", r, code)
	}
	r, _ = probeOnce(t, "--protocol", "http", "--to", addr)
	if !r.OK || r.Reply != "api /" {
		t.Errorf("no path: %+v", r)
	}
}
