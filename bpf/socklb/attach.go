//go:build linux

package socklb

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// hook is one cgroup attachment.
type hook struct {
	name   string // link pin suffix
	prog   string // program name
	attach ebpf.AttachType
}

var hooks = []hook{
	{"connect4", SocklbProgKebpfConnect4, ebpf.AttachCGroupInet4Connect},
	{"connect6", SocklbProgKebpfConnect6, ebpf.AttachCGroupInet6Connect},
	{"sendmsg4", SocklbProgKebpfSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
	{"sendmsg6", SocklbProgKebpfSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
	{"recvmsg4", SocklbProgKebpfRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
	{"recvmsg6", SocklbProgKebpfRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg},
	{"getpeer4", SocklbProgKebpfGetpeer4, ebpf.AttachCgroupInet4GetPeername},
	{"getpeer6", SocklbProgKebpfGetpeer6, ebpf.AttachCgroupInet6GetPeername},
}

// Hooks lists the hook names (link pin suffixes) in attach order.
func Hooks() []string {
	names := make([]string, len(hooks))
	for i, h := range hooks {
		names[i] = h.name
	}
	return names
}

// Attach attaches every program at the cgroup v2 directory cgroupPath and
// pins each link. Like sockstats it is idempotent across restarts: a pinned
// link for the same cgroup gets the new program swapped in (no window
// without translation, never two attachments); one for another cgroup is
// detached and replaced.
func (o *Objects) Attach(cgroupPath string) error {
	if len(o.links) > 0 {
		return errors.New("attach socklb: already attached")
	}
	var fresh []link.Link
	for _, h := range hooks {
		l, created, err := o.attachHook(h, cgroupPath)
		if err != nil {
			// Undo only what this call attached anew: swapped pinned links
			// keep running the (equivalent) new program.
			for _, f := range fresh {
				pins.DetachAndClose(f)
			}
			for _, l := range o.links {
				l.Close()
			}
			o.links = map[string]link.Link{}
			return err
		}
		if created {
			fresh = append(fresh, l)
		}
		o.links[h.name] = l
	}
	return nil
}

func (o *Objects) attachHook(h hook, cgroupPath string) (link.Link, bool, error) {
	return pins.AttachCgroup(h.prog, LinkPinPath(o.pinDir, h.name), cgroupPath, h.attach, o.objs.program(h.prog))
}

// Attached reports whether Attach succeeded.
func (o *Objects) Attached() bool { return len(o.links) > 0 }

// Detach removes every attachment and every pin (links and maps), then
// closes everything: the service LB is gone until the next Load+Attach.
func (o *Objects) Detach() error {
	var errs []error
	for name, l := range o.links {
		if err := pins.DetachAndClose(l); err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", name, err))
		}
	}
	o.links = map[string]link.Link{}
	if err := detachPinnedLinks(o.pinDir); err != nil {
		errs = append(errs, err)
	}
	for _, m := range []*ebpf.Map{o.objs.KebpfLbSvc4, o.objs.KebpfLbSvc6, o.objs.KebpfLbBe,
		o.objs.KebpfLbAff, o.objs.KebpfLbRev, o.objs.KebpfLbStats} {
		if err := m.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin map: %w", err))
		}
	}
	if err := o.Close(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
