//go:build linux

package sockmap

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// Reattach moves the connect programs to the end of cgroupPath's run
// order: the agent calls it when the socket LB's were attached after them
// (CheckOrder fails, e.g. service-lb enabled again while l7 runs). The new
// links are attached before the old ones go, so no connect() is ever
// unsteered (while both run, the second sees Envoy's address and passes).
// Maps, sockops, getsockopt and sk_msg stay: live connections are untouched.
func (o *Objects) Reattach(cgroupPath string) error {
	fresh := map[string]link.Link{}
	for _, h := range hooks {
		if h.Attach != ebpf.AttachCGroupInet4Connect && h.Attach != ebpf.AttachCGroupInet6Connect {
			continue
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: h.Attach, Program: o.program(h.Prog)})
		if err != nil {
			return errors.Join(fmt.Errorf("reattach %s: %w", h.Prog, err), pins.DetachLinks(fresh))
		}
		fresh[h.Name] = l
	}
	var errs []error
	for name, l := range fresh {
		pin := LinkPinPath(o.pinDir, name)
		if old, ok := o.links[name]; ok {
			errs = append(errs, pins.DetachAndClose(old))
		} else {
			errs = append(errs, pins.DetachPinnedLinks([]string{pin}))
		}
		if err := l.Pin(pin); err != nil {
			errs = append(errs, fmt.Errorf("pin %s: %w", pin, err))
		}
		o.links[name] = l
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return CheckOrder(cgroupPath)
}
