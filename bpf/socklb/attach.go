//go:build linux

package socklb

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

var hooks = []pins.CgroupHook{
	{Name: "connect4", Prog: SocklbProgKebpfConnect4, Attach: ebpf.AttachCGroupInet4Connect},
	{Name: "connect6", Prog: SocklbProgKebpfConnect6, Attach: ebpf.AttachCGroupInet6Connect},
	{Name: "sendmsg4", Prog: SocklbProgKebpfSendmsg4, Attach: ebpf.AttachCGroupUDP4Sendmsg},
	{Name: "sendmsg6", Prog: SocklbProgKebpfSendmsg6, Attach: ebpf.AttachCGroupUDP6Sendmsg},
	{Name: "recvmsg4", Prog: SocklbProgKebpfRecvmsg4, Attach: ebpf.AttachCGroupUDP4Recvmsg},
	{Name: "recvmsg6", Prog: SocklbProgKebpfRecvmsg6, Attach: ebpf.AttachCGroupUDP6Recvmsg},
	{Name: "getpeer4", Prog: SocklbProgKebpfGetpeer4, Attach: ebpf.AttachCgroupInet4GetPeername},
	{Name: "getpeer6", Prog: SocklbProgKebpfGetpeer6, Attach: ebpf.AttachCgroupInet6GetPeername},
}

// Hooks lists the hook names (link pin suffixes) in attach order.
func Hooks() []string { return pins.HookNames(hooks) }

// Attach attaches every program at the cgroup v2 directory cgroupPath and
// pins each link. Like sockstats it is idempotent across restarts: a pinned
// link for the same cgroup gets the new program swapped in (no window
// without translation, never two attachments); one for another cgroup is
// detached and replaced.
func (o *Objects) Attach(cgroupPath string) error {
	if len(o.links) > 0 {
		return errors.New("attach socklb: already attached")
	}
	links, err := pins.AttachCgroupHooks(hooks, func(h string) string { return LinkPinPath(o.pinDir, h) },
		cgroupPath, o.objs.program)
	if err != nil {
		return err
	}
	o.links = links
	// The links run the new programs: entries the old ones wrote since
	// Load's copy can be caught up now.
	if err := o.finishMigration(); err != nil {
		o.opts.Logger.Warn("catch up migrated maps", "err", err)
	}
	return nil
}

// Attached reports whether Attach succeeded.
func (o *Objects) Attached() bool { return len(o.links) > 0 }

// Detach removes every attachment and every pin (links and maps), then
// closes everything: the service LB is gone until the next Load+Attach.
func (o *Objects) Detach() error {
	errs := []error{pins.DetachLinks(o.links), detachPinnedLinks(o.pinDir)}
	o.links = map[string]link.Link{}
	for _, m := range []*ebpf.Map{o.objs.KebpfLbSvc4, o.objs.KebpfLbSvc6, o.objs.KebpfLbBe,
		o.objs.KebpfLbAff, o.objs.KebpfLbRev, o.objs.KebpfLbStats,
		o.objs.KebpfLbEvents, o.objs.KebpfLbLost, o.objs.KebpfLbCfg} {
		if err := m.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin map: %w", err))
		}
	}
	if err := o.Close(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
