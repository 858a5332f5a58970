package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// nslookup answers like the classic tool for `nslookup NAME` (the image
// also carries this binary as /usr/bin/nslookup), so "does cluster DNS work
// from a pod" is the command everyone types. It resolves through the pod's
// /etc/resolv.conf (search list included) over UDP; exit 1 on failure.
func nslookup(args []string, out, errOut io.Writer) int {
	if len(args) != 1 || strings.HasPrefix(args[0], "-") {
		fmt.Fprintln(errOut, "usage: nslookup NAME")
		return 2
	}
	name := args[0]
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := probeDNS(ctx, name, "udp", "", false)
	server := strings.Split(r.Server, ",")[0]
	if host, port, serr := net.SplitHostPort(server); serr == nil {
		fmt.Fprintf(out, "Server:\t\t%s\nAddress:\t%s#%s\n\n", host, host, port)
	}
	if err != nil {
		fmt.Fprintf(out, "** server can't find %s: %v\n", name, err)
		return 1
	}
	canonical := name
	res := &net.Resolver{PreferGo: true}
	if c, err := res.LookupCNAME(ctx, name); err == nil && c != "" {
		canonical = strings.TrimSuffix(c, ".")
	}
	for _, a := range strings.Split(r.Reply, ",") {
		fmt.Fprintf(out, "Name:\t%s\nAddress: %s\n", canonical, a)
	}
	return 0
}
