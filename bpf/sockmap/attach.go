//go:build linux

package sockmap

import (
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

var hooks = []pins.CgroupHook{
	{Name: "connect4", Prog: SockmapProgKebpfL7Conn4, Attach: ebpf.AttachCGroupInet4Connect},
	{Name: "connect6", Prog: SockmapProgKebpfL7Conn6, Attach: ebpf.AttachCGroupInet6Connect},
	{Name: "sockops", Prog: SockmapProgKebpfL7Sops, Attach: ebpf.AttachCGroupSockOps},
	{Name: "getsockopt", Prog: SockmapProgKebpfL7Gsopt, Attach: ebpf.AttachCGroupGetsockopt},
}

// LBConnect4Name is the socket LB's connect4 program (bpf/socklb). Within
// one cgroup, multi-attached programs run in attach order; steering must see
// the backend the LB chose, so it must run after the LB (README.md).
const LBConnect4Name = "kebpf_connect4"

// Hooks lists the cgroup hook names (link pin suffixes) in attach order.
func Hooks() []string { return pins.HookNames(hooks) }

func (o *Objects) program(name string) *ebpf.Program {
	switch name {
	case SockmapProgKebpfL7Conn4:
		return o.objs.KebpfL7Conn4
	case SockmapProgKebpfL7Conn6:
		return o.objs.KebpfL7Conn6
	case SockmapProgKebpfL7Sops:
		return o.objs.KebpfL7Sops
	case SockmapProgKebpfL7Gsopt:
		return o.objs.KebpfL7Gsopt
	}
	return nil
}

// Attach attaches the sk_msg program to the SOCKHASH and the cgroup
// programs at the cgroup v2 directory cgroupPath, pinning each link.
// Idempotent across restarts: pinned links at the same cgroup get the new
// program swapped in, keeping their place in the run order.
//
// The sk_msg program goes first: a socket sockops puts in the SOCKHASH
// before a verdict program exists would never be redirected.
func (o *Objects) Attach(cgroupPath string) error {
	if len(o.links) > 0 || o.msgOn {
		return errors.New("attach sockmap: already attached")
	}
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target:  o.objs.KebpfL7Socks.FD(),
		Program: o.objs.KebpfL7Msg,
		Attach:  ebpf.AttachSkMsgVerdict,
	}); err != nil {
		return fmt.Errorf("attach %s to %s: %w", SockmapProgKebpfL7Msg, SockmapMapKebpfL7Socks, err)
	}
	o.msgOn = true
	links, err := pins.AttachCgroupHooks(hooks, func(h string) string { return LinkPinPath(o.pinDir, h) },
		cgroupPath, o.program)
	if err != nil {
		return err
	}
	if err := CheckOrder(cgroupPath); err != nil {
		// Leave nothing attached in the wrong order: a ClusterIP
		// connection could then bypass Envoy.
		return errors.Join(err, pins.DetachLinks(links))
	}
	o.links = links
	// The links run the new programs: entries the old ones wrote since
	// Load's copy can be caught up now.
	if err := o.finishMigration(); err != nil {
		slog.Warn("catch up migrated maps", "err", err)
	}
	return nil
}

// CheckOrder reports an error when the socket LB's connect4 program runs
// after the steering connect4 at cgroupPath: a ClusterIP connection would
// then be steered on its VIP (never selected) and reach the backend around
// Envoy. Run it whenever either package re-attaches.
func CheckOrder(cgroupPath string) error {
	cg, err := os.Open(cgroupPath)
	if err != nil {
		return fmt.Errorf("check connect4 order: %w", err)
	}
	defer cg.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: ebpf.AttachCGroupInet4Connect})
	if err != nil {
		return fmt.Errorf("check connect4 order: query %s: %w", cgroupPath, err)
	}
	steerAt := -1
	for i, ap := range res.Programs {
		p, err := ebpf.NewProgramFromID(ap.ID)
		if err != nil {
			continue // detached meanwhile
		}
		info, err := p.Info()
		p.Close()
		if err != nil {
			continue
		}
		switch info.Name {
		case SockmapProgKebpfL7Conn4:
			if steerAt < 0 {
				steerAt = i
			}
		case LBConnect4Name:
			if steerAt >= 0 {
				return fmt.Errorf("check connect4 order at %s: %s runs before %s; detach and re-attach sockmap after socklb",
					cgroupPath, SockmapProgKebpfL7Conn4, LBConnect4Name)
			}
		}
	}
	return nil
}

// Attached reports whether Attach succeeded.
func (o *Objects) Attached() bool { return len(o.links) > 0 }

// Detach removes every attachment and pin (links, this package's maps),
// clears the maps shared with bpf/netpol (they stay pinned: README, "Maps
// shared with bpf/netpol"), then closes everything: steering is gone until
// the next Load+Attach.
func (o *Objects) Detach() error {
	// Steering off first (see DetachPinned).
	errs := []error{pins.ClearMap(o.objs.KebpfL7Dst)}
	errs = append(errs, pins.DetachLinks(o.links), detachPinnedLinks(o.pinDir))
	o.links = map[string]link.Link{}
	if err := detachMsg(o.objs.KebpfL7Socks); err != nil {
		errs = append(errs, err)
	}
	o.msgOn = false
	for _, name := range sharedMaps {
		if err := pins.ClearMap(o.mapByName(name)); err != nil {
			errs = append(errs, fmt.Errorf("clear %s: %w", name, err))
		}
	}
	for _, name := range ownMaps {
		if err := o.mapByName(name).Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", name, err))
		}
	}
	if err := o.Close(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (o *Objects) mapByName(name string) *ebpf.Map {
	switch name {
	case SockmapMapKebpfL7Dst:
		return o.objs.KebpfL7Dst
	case SockmapMapKebpfL7Cfg:
		return o.objs.KebpfL7Cfg
	case SockmapMapKebpfL7Envcg:
		return o.objs.KebpfL7Envcg
	case SockmapMapKebpfL7Cookie:
		return o.objs.KebpfL7Cookie
	case SockmapMapKebpfL7Orig:
		return o.objs.KebpfL7Orig
	case SockmapMapKebpfL7Socks:
		return o.objs.KebpfL7Socks
	case SockmapMapKebpfL7Stats:
		return o.objs.KebpfL7Stats
	case SockmapMapKebpfL7Active:
		return o.objs.KebpfL7Active
	case SockmapMapKebpfL7Events:
		return o.objs.KebpfL7Events
	case SockmapMapKebpfL7Lost:
		return o.objs.KebpfL7Lost
	}
	return nil
}

// detachMsg detaches whatever sk_msg program the SOCKHASH m holds (this
// agent's or an earlier one's), found by BPF_PROG_QUERY on the map since
// BPF_PROG_DETACH needs the program itself.
func detachMsg(m *ebpf.Map) error {
	res, err := link.QueryPrograms(link.QueryOptions{Target: m.FD(), Attach: ebpf.AttachSkMsgVerdict})
	if err != nil {
		return fmt.Errorf("query sk_msg of %s: %w", SockmapMapKebpfL7Socks, err)
	}
	var errs []error
	for _, ap := range res.Programs {
		p, err := ebpf.NewProgramFromID(ap.ID)
		if err != nil {
			continue
		}
		err = link.RawDetachProgram(link.RawDetachProgramOptions{Target: m.FD(), Program: p, Attach: ebpf.AttachSkMsgVerdict})
		p.Close()
		if err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("detach sk_msg from %s: %w", SockmapMapKebpfL7Socks, err))
		}
	}
	return errors.Join(errs...)
}
