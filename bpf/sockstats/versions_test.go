//go:build linux

package sockstats

import (
	"testing"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// Every pinned map of the program has an upgrade policy.
func TestMapVersionsCoverSpec(t *testing.T) {
	spec, err := LoadSockstats()
	if err != nil {
		t.Fatal(err)
	}
	if err := pins.CheckTable(spec, mapVersions); err != nil {
		t.Fatal(err)
	}
}
