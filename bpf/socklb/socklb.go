//go:build linux

// Package socklb is the connect-time service load balancer: cgroup
// connect/sendmsg programs translate Service frontends to backends before a
// socket ever sends a packet, recvmsg/getpeername programs show the
// application the frontend again, and an iter/udp program destroys
// connected UDP sockets whose backend went away.
//
// Maps live under <pinDir>/maps and links under <pinDir>/links/socklb_<hook>,
// so translation keeps working while the agent restarts; a new agent reads
// the maps back (Services) and swaps its programs into the pinned links.
//
// Decisions are written as trace events to the ring buffer kebpf_lb_events
// (Event, ParseEvent; losses in kebpf_lb_lost; switch: SetTrace). README.md
// documents the record layout, the switch and the measured cost.
package socklb

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

const (
	// LinkPinPrefix prefixes the pinned link file names under <pinDir>/links.
	LinkPinPrefix = "socklb_"
	// KillProgramName is the iter/udp program that destroys sockets.
	KillProgramName = SocklbProgKebpfUdpKill
)

// svcState is what this process knows it wrote for one service.
type svcState struct {
	frontends []Frontend
	backends  []Backend
	base      uint32
	affinity  time.Duration
}

// Objects is the loaded socket LB: programs, pinned maps, and after Attach
// the cgroup links. It implements Datapath against the pinned maps.
type Objects struct {
	objs    cgroupObjects
	kill    *ebpf.Program // nil when bpf_sock_destroy is unavailable
	killErr error
	links   map[string]link.Link
	pinDir  string
	opts    LoadOptions
	// migration holds the maps Load replaced until the links run the new
	// programs (Attach) or this process lets go (Close).
	migration *pins.Migration

	mu           sync.Mutex
	svcs         map[uint32]*svcState
	owner        map[Frontend]uint32
	usedBackends int
}

var _ Datapath = (*Objects)(nil)

// SocketDestroyError is nil when DestroySocketsTo works, else why not.
func (o *Objects) SocketDestroyError() error { return o.killErr }

// Datapath returns o as the agent's map layer.
func (o *Objects) Datapath() Datapath { return o }

// Close releases this process's handles. Pinned links and maps stay, so
// translation continues; use Detach to remove it.
func (o *Objects) Close() error {
	errs := []error{o.finishMigration(), pins.CloseLinks(o.links)}
	o.links = map[string]link.Link{}
	if o.kill != nil {
		errs = append(errs, o.kill.Close())
		o.kill = nil
	}
	if err := o.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close objects: %w", err))
	}
	return errors.Join(errs...)
}

// finishMigration catches up and releases the maps Load replaced (no-op
// when none or already done).
func (o *Objects) finishMigration() error {
	err := o.migration.Finish()
	o.migration = nil
	return err
}
