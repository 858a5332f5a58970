//go:build linux

// Package sockmap is the L7 steering datapath: cgroup connect4/6 programs
// rewrite connections to selected pod IP:ports to the node-local Envoy and
// record the original destination, a cgroup getsockopt program answers it
// to Envoy as SO_ORIGINAL_DST, and sockops + sk_msg carry the payload between
// the client and Envoy without the loopback TCP stack. See README.md.
//
// Maps live under <pinDir>/maps and links under <pinDir>/links/sockmap_<hook>
// (the sk_msg program is attached to the pinned SOCKHASH itself), so
// steering and established connections survive an agent restart.
package sockmap

import (
	"errors"
	"fmt"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// LinkPinPrefix prefixes the pinned link file names under <pinDir>/links.
const LinkPinPrefix = "sockmap_"

// Objects is the loaded L7 datapath: programs, pinned maps and, after
// Attach, the cgroup links and the sk_msg attachment.
type Objects struct {
	pinDir string
	objs   SockmapObjects

	mu     sync.Mutex // guards kebpf_l7_cfg read-modify-write
	links  map[string]link.Link
	msgOn  bool // sk_msg attached to kebpf_l7_socks by this Objects
	closed bool
	// migration holds the maps Load replaced until the links run the new
	// programs (Attach) or this process lets go (Close).
	migration *pins.Migration
}

// finishMigration catches up and releases the maps Load replaced (no-op
// when none or already done).
func (o *Objects) finishMigration() error {
	err := o.migration.Finish()
	o.migration = nil
	return err
}

// Close releases this process's handles. Attachments stay (pinned links,
// the sk_msg program held by the pinned SOCKHASH): use Detach to remove them.
func (o *Objects) Close() error {
	errs := []error{o.finishMigration(), pins.CloseLinks(o.links)}
	o.links = map[string]link.Link{}
	if !o.closed {
		o.closed = true
		if err := o.objs.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close objects: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Socks is the SOCKHASH both local ends of a steered connection live in
// (for tests and debugging: iterate it to see the live pairs).
func (o *Objects) Socks() *ebpf.Map { return o.objs.KebpfL7Socks }
