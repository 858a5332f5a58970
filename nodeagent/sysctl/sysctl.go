// Package sysctl sets the kernel parameters of the node's network
// namespace that the datapath relies on. The agent's privileged init
// container applies them (the long-running agent sees /proc/sys read-only).
package sysctl

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
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

// recordSuffix names the file, in a record dir, that keeps a parameter's
// value from before our first change.
const recordSuffix = ".before-kubectl-ebpf"

func recordPath(dir, name string) string {
	return filepath.Join(dir, strings.ReplaceAll(name, "/", ".")+recordSuffix)
}

// EnsureRecorded is Ensure that also keeps, in recordDir, the value the
// parameter held before the first change of ours, for Restore. Later
// changes (the value was reset meanwhile) keep the first record.
func EnsureRecorded(procSys, name, value, recordDir string) (prev string, changed bool, err error) {
	prev, changed, err = Ensure(procSys, name, value)
	if err != nil || !changed {
		return prev, changed, err
	}
	rec := recordPath(recordDir, name)
	if _, err := os.Stat(rec); err == nil {
		return prev, changed, nil
	}
	if err := os.MkdirAll(recordDir, 0o755); err != nil {
		return prev, changed, fmt.Errorf("record %s: %w", name, err)
	}
	if err := os.WriteFile(rec, []byte(prev+"\n"), 0o644); err != nil {
		return prev, changed, fmt.Errorf("record %s: %w", name, err)
	}
	return prev, changed, nil
}

// Restore sets every parameter recorded in recordDir back to its recorded
// value and removes the record; it returns one line per parameter restored.
// No record dir: nothing to restore.
func Restore(procSys, recordDir string) ([]string, error) {
	entries, err := os.ReadDir(recordDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var done []string
	var errs []error
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), recordSuffix) {
			continue
		}
		name := strings.ReplaceAll(strings.TrimSuffix(e.Name(), recordSuffix), ".", "/")
		rec := filepath.Join(recordDir, e.Name())
		b, err := os.ReadFile(rec)
		if err == nil {
			var changed bool
			_, changed, err = Ensure(procSys, name, string(bytes.TrimSpace(b)))
			if err == nil && changed {
				done = append(done, fmt.Sprintf("restored %s to %s", name, bytes.TrimSpace(b)))
			}
		}
		if err == nil {
			err = os.Remove(rec)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("restore %s: %w", name, err))
		}
	}
	return done, errors.Join(errs...)
}
