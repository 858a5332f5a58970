//go:build linux

package netpol

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// AttachMode is how the programs are hooked to the pod interfaces.
type AttachMode int

const (
	// AttachAuto uses tcx when the kernel has it (6.6+), else clsact. The
	// kernel is probed once per process.
	AttachAuto AttachMode = iota
	// AttachTCX attaches pinned tcx links at the head of the chain. Load
	// fails on a kernel without tcx.
	AttachTCX
	// AttachClsact adds direct-action cls_bpf filters to the interface's
	// clsact qdisc (created when missing) at ClsactPriority/ClsactHandle.
	// Filters are not pinned: they stay until removed, and Detach and
	// DetachPinned find them by name.
	AttachClsact
)

var attachModeNames = [...]string{AttachAuto: "auto", AttachTCX: "tcx", AttachClsact: "clsact"}

func (m AttachMode) String() string {
	if m >= 0 && int(m) < len(attachModeNames) {
		return attachModeNames[m]
	}
	return "AttachMode(" + strconv.Itoa(int(m)) + ")"
}

// ParseAttachMode parses "auto", "tcx" or "clsact" (the String forms).
func ParseAttachMode(s string) (AttachMode, error) {
	for m, name := range attachModeNames {
		if s == name {
			return AttachMode(m), nil
		}
	}
	return 0, fmt.Errorf("attach mode %q: want auto, tcx or clsact", s)
}

// Set and Type make *AttachMode a command-line flag value (pflag.Value,
// flag.Value).
func (m *AttachMode) Set(s string) error {
	v, err := ParseAttachMode(s)
	if err != nil {
		return err
	}
	*m = v
	return nil
}

func (m *AttachMode) Type() string { return "auto|tcx|clsact" }

// tcxSupported probes the kernel for tcx links once per process: creating
// one on a nonexistent interface fails with ENODEV where tcx exists.
var tcxSupported = sync.OnceValue(func() bool {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
	})
	if err != nil {
		// Cannot even load a tc program: let the real attach report it.
		return true
	}
	defer prog.Close()
	l, err := link.AttachTCX(link.TCXOptions{Interface: int(^uint32(0) >> 1), Program: prog, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		l.Close()
	}
	return !errors.Is(err, link.ErrNotSupported)
})

// resolve turns AttachAuto into the mode this kernel supports.
func (m AttachMode) resolve() (AttachMode, error) {
	switch m {
	case AttachAuto:
		if tcxSupported() {
			return AttachTCX, nil
		}
		return AttachClsact, nil
	case AttachTCX, AttachClsact:
		return m, nil
	}
	return 0, fmt.Errorf("invalid attach mode %d", m)
}

// hook is one of the two attachments per interface.
type hook struct {
	suffix    string // link pin suffix
	attach    ebpf.AttachType
	clsactDir string // clsact hook
	prog      string // program name, also the cls_bpf filter's TCA_BPF_NAME
}

var hooks = [2]hook{
	{"from", ebpf.AttachTCXIngress, "ingress", FromProgramName},
	{"to", ebpf.AttachTCXEgress, "egress", ToProgramName},
}

// AttachMode is the mechanism the programs are attached with: AttachTCX or
// AttachClsact (AttachAuto resolved at Load).
func (o *Objects) AttachMode() AttachMode { return o.mode }

// attach makes sure ifindex has both programs attached in o.mode, and only
// in that mode: the other mode's attachments (left by an agent run with
// another mode) are removed once the new ones are in place, so packets are
// never unenforced.
func (o *Objects) attach(ifindex int) error {
	progs := [2]*ebpf.Program{o.objs.KebpfNpFrom, o.objs.KebpfNpTo}
	if o.mode == AttachClsact {
		if o.filters[ifindex] {
			return nil
		}
		// Replaces the filters of an earlier process in place.
		if err := attachClsact(ifindex, progs); err != nil {
			return err
		}
		o.filters[ifindex] = true
		return o.detachLinks(ifindex)
	}
	held := o.links[ifindex]
	if held[0] != nil && held[1] != nil {
		return nil
	}
	if err := o.attachTCX(ifindex, progs); err != nil {
		return err
	}
	if err := detachClsact(ifindex); err != nil {
		return fmt.Errorf("remove clsact filters of ifindex %d: %w", ifindex, err)
	}
	return nil
}

// attachTCX: held links are kept, pinned ones get this process's programs,
// a pin for a vanished or different interface is replaced.
func (o *Objects) attachTCX(ifindex int, progs [2]*ebpf.Program) error {
	held := o.links[ifindex]
	for i, h := range hooks {
		if held[i] != nil {
			continue
		}
		l, err := o.attachHook(ifindex, h, progs[i])
		if err != nil {
			return err
		}
		held[i] = l
		o.links[ifindex] = held
	}
	return nil
}

func (o *Objects) attachHook(ifindex int, h hook, prog *ebpf.Program) (link.Link, error) {
	pin := LinkPinPath(o.pinDir, ifindex, h.suffix)
	l, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		if sameTCX(l, ifindex, h.attach) {
			if err := l.Update(prog); err == nil {
				return l, nil
			}
		}
		// Defunct (the interface went away, the ifindex was reused) or
		// not updatable: replace it so exactly one attachment remains.
		if err := pins.DetachAndClose(l); err != nil {
			return nil, fmt.Errorf("replace pinned link %s: %w", pin, err)
		}
	case errors.Is(err, os.ErrNotExist):
	default:
		return nil, fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	// Head: run before a chained CNI program can redirect the packet past us.
	l, err = link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: h.attach, Anchor: link.Head()})
	if err != nil {
		if errors.Is(err, link.ErrNotSupported) {
			return nil, fmt.Errorf("attach %s to ifindex %d: tcx unavailable (kernel < 6.6), use AttachClsact: %w", prog, ifindex, err)
		}
		return nil, fmt.Errorf("attach %s to ifindex %d: %w", h.suffix, ifindex, err)
	}
	if err := l.Pin(pin); err != nil {
		// Unpinned, the attachment would vanish with this process.
		l.Close()
		return nil, fmt.Errorf("pin link %s: %w", pin, err)
	}
	return l, nil
}

func sameTCX(l link.Link, ifindex int, at ebpf.AttachType) bool {
	info, err := l.Info()
	if err != nil {
		return false
	}
	tcx := info.TCX()
	return tcx != nil && int(tcx.Ifindex) == ifindex && ebpf.AttachType(tcx.AttachType) == at
}

// detach removes ifindex's attachments: links, held or only pinned, and
// clsact filters (whatever the mode: cleanup must not depend on it). A
// vanished interface is not an error.
func (o *Objects) detach(ifindex int) error {
	errs := []error{o.detachLinks(ifindex)}
	if err := detachClsact(ifindex); err != nil {
		errs = append(errs, fmt.Errorf("detach clsact filters of ifindex %d: %w", ifindex, err))
	}
	delete(o.filters, ifindex)
	return errors.Join(errs...)
}

// detachLinks removes ifindex's tcx links, held or only pinned.
func (o *Objects) detachLinks(ifindex int) error {
	var errs []error
	held := o.links[ifindex]
	for i, h := range hooks {
		l := held[i]
		if l == nil {
			pl, err := link.LoadPinnedLink(LinkPinPath(o.pinDir, ifindex, h.suffix), nil)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("load pinned link %s: %w", h.suffix, err))
				continue
			}
			l = pl
		}
		if err := pins.DetachAndClose(l); err != nil {
			errs = append(errs, fmt.Errorf("detach ifindex %d %s: %w", ifindex, h.suffix, err))
		}
	}
	delete(o.links, ifindex)
	return errors.Join(errs...)
}
