package main

import (
	"encoding/binary"
	"io"
	"net"
	"strings"
	"testing"
)

// dnsAnswer answers a query for want (FQDN, lower case) with one A record
// 10.1.2.3 and anything else with NXDOMAIN; nil for what is no query.
func dnsAnswer(q []byte, want string) []byte {
	if len(q) < 12 {
		return nil
	}
	// The question name starts at 12: length-prefixed labels, then 0.
	var labels []string
	i := 12
	for i < len(q) && q[i] != 0 {
		n := int(q[i])
		if i+1+n > len(q) {
			return nil
		}
		labels = append(labels, string(q[i+1:i+1+n]))
		i += 1 + n
	}
	end := i + 1 + 4 // root label, QTYPE, QCLASS
	if end > len(q) {
		return nil
	}
	resp := append([]byte{}, q[:end]...)
	resp[2] = 0x80 | q[2]&0x01 // QR, keep RD
	resp[3] = 0x80             // RA, NOERROR
	binary.BigEndian.PutUint16(resp[6:], 0)
	binary.BigEndian.PutUint16(resp[8:], 0)
	binary.BigEndian.PutUint16(resp[10:], 0)
	qtype := binary.BigEndian.Uint16(q[i+1:])
	if strings.ToLower(strings.Join(labels, ".")+".") != want {
		resp[3] |= 3 // NXDOMAIN
		return resp
	}
	if qtype == 1 {
		binary.BigEndian.PutUint16(resp[6:], 1)
		// Name: pointer to the question's; A, IN, TTL 30, 4 bytes.
		resp = append(resp, 0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 1, 2, 3)
	}
	return resp
}

// dnsServers serves want on UDP and TCP on one loopback port. reply is the
// socket UDP answers go out of: the server's own, or another one to
// stand for a reply whose source a socket LB failed to rewrite.
func dnsServers(t *testing.T, want string, otherSource bool) (addr string, replySource net.Addr) {
	t.Helper()
	// One port for UDP and TCP, as a DNS server has: the UDP port the
	// kernel picks may be taken for TCP by another test's socket, so try
	// again on another.
	var uc net.PacketConn
	var l net.Listener
	var err error
	for try := 0; ; try++ {
		if uc, err = net.ListenPacket("udp4", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		if l, err = net.Listen("tcp4", uc.LocalAddr().String()); err == nil {
			break
		}
		uc.Close()
		if try == 20 {
			t.Fatalf("no port free for both UDP and TCP: %v", err)
		}
	}
	t.Cleanup(func() { uc.Close() })
	out := uc
	if otherSource {
		if out, err = net.ListenPacket("udp4", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { out.Close() })
	}
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := uc.ReadFrom(buf)
			if err != nil {
				return
			}
			if r := dnsAnswer(buf[:n], want); r != nil {
				out.WriteTo(r, from)
			}
		}
	}()

	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				for {
					var n uint16
					if binary.Read(c, binary.BigEndian, &n) != nil {
						return
					}
					q := make([]byte, n)
					if _, err := io.ReadFull(c, q); err != nil {
						return
					}
					r := dnsAnswer(q, want)
					c.Write(binary.BigEndian.AppendUint16(nil, uint16(len(r))))
					c.Write(r)
				}
			}()
		}
	}()
	return uc.LocalAddr().String(), out.LocalAddr()
}

func TestProbeDNS(t *testing.T) {
	const name = "svc.kebpf.test."
	srv, _ := dnsServers(t, name, false)
	other, otherSrc := dnsServers(t, name, true)
	for _, tc := range []struct {
		name      string
		args      []string
		wantOK    bool
		wantPeer  string
		wantClass string
	}{
		{"udp connected", []string{"--server", srv}, true, srv, ""},
		{"udp unconnected", []string{"--server", srv, "--unconnected"}, true, srv, ""},
		{"tcp", []string{"--server", srv, "--transport", "tcp"}, true, srv, ""},
		{"nxdomain", []string{"--server", srv, "--to", "nothing.kebpf.test."}, false, srv, "notfound"},
		// An answer from another address: the unconnected socket takes it
		// and the probe names its real source (what the e2e row checks);
		// the kernel drops it for a connected socket, so the lookup times out.
		{"unconnected reply from another source", []string{"--server", other, "--unconnected"}, true, otherSrc.String(), ""},
		{"connected reply from another source", []string{"--server", other, "--timeout", "1s"}, false, "", "timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"--protocol", "dns", "--to", name}, tc.args...)
			r, code := probeOnce(t, args...)
			if r.OK != tc.wantOK || r.Peer != tc.wantPeer || r.Class != tc.wantClass || (code == 0) != tc.wantOK {
				t.Fatalf("got %+v (exit %d), want ok=%v peer=%q class=%q", r, code, tc.wantOK, tc.wantPeer, tc.wantClass)
			}
			if tc.wantOK && r.Reply != "10.1.2.3" {
				t.Errorf("reply %q, want 10.1.2.3", r.Reply)
			}
			if !strings.Contains(r.Server, "127.0.0.1:") {
				t.Errorf("server %q, want the one asked", r.Server)
			}
		})
	}
	if code := probe([]string{"--protocol", "dns", "--to", name, "--transport", "sctp"}, io.Discard); code != 2 {
		t.Errorf("unknown transport: exit %d, want 2", code)
	}
}
