// Package sysctl sets the kernel parameters of the node's network
// namespace that the datapath relies on. The agent's privileged init
// container applies them (the long-running agent sees /proc/sys read-only).
package sysctl

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
)

// DefaultProcSys is where the kernel's parameters are.
const DefaultProcSys = "/proc/sys"

// TCPMigrateReq is net.ipv4.tcp_migrate_req (Linux 5.14+). Set to 1, a
// listener of a SO_REUSEPORT group that closes hands the connections
// queued on it (handshake done or under way, not yet accepted) to another
// listener of the group instead of resetting them. The node's Envoys share
// their listener that way while the DaemonSet replaces one (manifests
// 50-envoy.yaml, maxSurge): without it, the connects that reached the old
// Envoy's queue in the instant its listeners close fail. It changes nothing
// for sockets outside a reuseport group.
const TCPMigrateReq = "net/ipv4/tcp_migrate_req"

// Ensure makes the parameter name (a path below procSys, like
// TCPMigrateReq) hold value, writing only when it holds something else,
// and returns what it held. A parameter the kernel does not have is an
// error matching os.ErrNotExist. Parameters of the network namespace
// (net/...) are those of the calling thread's namespace.
func Ensure(procSys, name, value string) (prev string, changed bool, err error) {
	path := filepath.Join(procSys, name)
	b, err := os.ReadFile(path)
	if err != nil {
		return "", false, fmt.Errorf("read %s: %w", path, err)
	}
	prev = string(bytes.TrimSpace(b))
	if prev == value {
		return prev, false, nil
	}
	if err := os.WriteFile(path, []byte(value+"\n"), 0); err != nil {
		return prev, false, fmt.Errorf("set %s to %s: %w", path, value, err)
	}
	return prev, true, nil
}
