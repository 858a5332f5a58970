package main

import (
	"context"
	"errors"
	"net"
	"sort"
	"strings"
	"sync"
)

// dnsProbe is one lookup through Go's own resolver (search list, ndots and
// nameserver from /etc/resolv.conf, as any pod's resolver reads them) whose
// connections we make ourselves, to force the transport and to see the
// address every answer came from.
type dnsProbe struct {
	transport   string // udp or tcp
	server      string // HOST:PORT to ask instead of resolv.conf's nameserver
	unconnected bool   // udp: sendto/recvfrom, as glibc's resolver does

	mu      sync.Mutex
	servers map[string]bool // where queries went
	sources map[string]bool // where answers came from
}

func (p *dnsProbe) noteServer(a string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.servers[a] = true
}

func (p *dnsProbe) noteSource(a net.Addr) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.sources[a.String()] = true
}

// dial is net.Resolver.Dial: Go's resolver uses datagram framing when the
// conn is a net.PacketConn and stream framing otherwise, so the transport is
// ours to choose whatever network it asks for.
func (p *dnsProbe) dial(ctx context.Context, _, addr string) (net.Conn, error) {
	if p.server != "" {
		addr = p.server
	}
	p.noteServer(addr)
	var d net.Dialer
	switch {
	case p.transport == "tcp":
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		// getpeername(): what a socket LB shows the client.
		p.noteSource(c.RemoteAddr())
		return c, nil
	case p.unconnected:
		dst, err := net.ResolveUDPAddr("udp", addr)
		if err != nil {
			return nil, err
		}
		network := "udp4"
		if dst.IP.To4() == nil {
			network = "udp6"
		}
		c, err := net.ListenUDP(network, nil)
		if err != nil {
			return nil, err
		}
		return &unconnectedUDP{UDPConn: c, dst: dst, probe: p}, nil
	default:
		c, err := d.DialContext(ctx, "udp", addr)
		if err != nil {
			return nil, err
		}
		return &connectedUDP{UDPConn: c.(*net.UDPConn), probe: p}, nil
	}
}

// connectedUDP reads with recvfrom() although connected: the kernel already
// drops datagrams from any other source, but the address it reports is what
// a socket LB's recvmsg hook rewrote.
type connectedUDP struct {
	*net.UDPConn
	probe *dnsProbe
}

func (c *connectedUDP) Read(b []byte) (int, error) {
	n, from, err := c.ReadFromUDP(b)
	if err == nil {
		c.probe.noteSource(from)
	}
	return n, err
}

// unconnectedUDP sends every query with sendto() and takes any answer: the
// reply's source is all a resolver has to match it to its server, so it must
// be the address the query went to (the Service's, not the backend's).
type unconnectedUDP struct {
	*net.UDPConn
	dst   *net.UDPAddr
	probe *dnsProbe
}

func (c *unconnectedUDP) Write(b []byte) (int, error) { return c.WriteToUDP(b, c.dst) }

func (c *unconnectedUDP) Read(b []byte) (int, error) {
	n, from, err := c.ReadFromUDP(b)
	if err == nil {
		c.probe.noteSource(from)
	}
	return n, err
}

// RemoteAddr is the server the queries go to.
func (c *unconnectedUDP) RemoteAddr() net.Addr { return c.dst }

// probeDNS looks name up (A records) and reports the addresses (Reply), the
// answers' source addresses (Peer) and the servers asked (Server), each
// sorted and comma-joined.
func probeDNS(ctx context.Context, name, transport, server string, unconnected bool) (Result, error) {
	p := &dnsProbe{transport: transport, server: server, unconnected: unconnected, servers: map[string]bool{}, sources: map[string]bool{}}
	res := &net.Resolver{PreferGo: true, Dial: p.dial}
	ips, err := res.LookupNetIP(ctx, "ip4", name)
	p.mu.Lock()
	r := Result{Peer: joinKeys(p.sources), Server: joinKeys(p.servers)}
	p.mu.Unlock()
	if err != nil {
		return r, err
	}
	addrs := make([]string, len(ips))
	for i, ip := range ips {
		addrs[i] = ip.Unmap().String()
	}
	sort.Strings(addrs)
	r.Reply = strings.Join(addrs, ",")
	if len(addrs) == 0 {
		return r, errors.New("no addresses")
	}
	return r, nil
}

func joinKeys(m map[string]bool) string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return strings.Join(ks, ",")
}
