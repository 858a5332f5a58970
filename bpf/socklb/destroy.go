//go:build linux

package socklb

import (
	"fmt"
	"io"
	"slices"

	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
)

// destroyRemoved destroys connected UDP sockets to backends of a UDP
// service that are no longer in svc. Failures are logged, not returned: the
// maps are already right, and a socket left connected only keeps talking to
// an endpoint that is going away, as it would with kube-proxy's conntrack.
func (o *Objects) destroyRemoved(svc Service, oldBackends []Backend, old *svcState) {
	if o.kill == nil || old == nil || len(oldBackends) == 0 {
		return
	}
	udp := false
	for _, f := range old.frontends {
		udp = udp || f.Proto == UDP
	}
	for _, f := range svc.Frontends {
		udp = udp || f.Proto == UDP
	}
	if !udp {
		return
	}
	netnses := []string{""}
	if o.opts.DestroyNetns != nil {
		netnses = o.opts.DestroyNetns()
	}
	for _, b := range oldBackends {
		if slices.Contains(svc.Backends, b) {
			continue
		}
		for _, ns := range netnses {
			if _, err := o.destroyLocked(ns, b, svc.ID); err != nil {
				o.opts.Logger.Warn("destroy udp sockets", "service", svc.ID, "backend", b, "netns", ns, "err", err)
			}
		}
	}
}

// DestroySocketsTo destroys the connected UDP sockets of the agent's own
// network namespace that socklb translated to b, and returns how many. The
// owners' next send or receive fails, and reconnecting picks a live backend.
func (o *Objects) DestroySocketsTo(b Backend) (int, error) {
	return o.DestroySocketsToIn("", b)
}

// DestroySocketsToIn is DestroySocketsTo for the network namespace at
// netnsPath ("" = own): UDP iterators only walk the namespace they are
// opened in, and pods' sockets live in the pods' namespaces.
func (o *Objects) DestroySocketsToIn(netnsPath string, b Backend) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.destroyLocked(netnsPath, b, 0)
}

// destroyLocked destroys the sockets to b; svcID (0: unknown) is what the
// trace events of the destroyed sockets name.
func (o *Objects) destroyLocked(netnsPath string, b Backend, svcID uint32) (int, error) {
	if o.kill == nil {
		return 0, fmt.Errorf("destroy sockets: %w", o.killErr)
	}
	b.IP = b.IP.Unmap()
	if !b.IP.IsValid() {
		return 0, fmt.Errorf("destroy sockets: invalid backend %v", b)
	}
	req := SocklbKillVal{Ip: ipWords(b.IP), Port: be16(b.Port), Family: fam6, SvcId: svcID}
	if b.IP.Is4() {
		req.Family = fam4
	}
	if err := o.objs.KebpfLbKill.Put(uint32(0), &req); err != nil {
		return 0, fmt.Errorf("write %s: %w", SocklbMapKebpfLbKill, err)
	}
	if err := netnsutil.Do(netnsPath, o.runKill); err != nil {
		return 0, err
	}
	var got SocklbKillVal
	if err := o.objs.KebpfLbKill.Lookup(uint32(0), &got); err != nil {
		return 0, fmt.Errorf("read %s: %w", SocklbMapKebpfLbKill, err)
	}
	return int(got.Destroyed), nil
}

func (o *Objects) runKill() error {
	it, err := link.AttachIter(link.IterOptions{Program: o.kill})
	if err != nil {
		return fmt.Errorf("attach %s: %w", KillProgramName, err)
	}
	defer it.Close()
	// The iterator binds to the network namespace of the thread that opens it.
	rd, err := it.Open()
	if err != nil {
		return fmt.Errorf("open %s: %w", KillProgramName, err)
	}
	defer rd.Close()
	if _, err := io.Copy(io.Discard, rd); err != nil {
		return fmt.Errorf("run %s: %w", KillProgramName, err)
	}
	return nil
}
