//go:build linux

package agent

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/cni"
)

// An agent started with --cni-unchain takes kebpf-cni out of the dirs an
// earlier install chained it into (chaining switched off or moved).
func TestAgentUnchainsEarlierInstallsDirs(t *testing.T) {
	root := t.TempDir()
	in := &cni.Installer{ConfDir: filepath.Join(root, "net.d"), BinDir: filepath.Join(root, "bin"),
		PluginBinary: filepath.Join(root, "kebpf-cni-src"), Entry: map[string]any{"socket": "/x.sock"}}
	for _, d := range []string{in.ConfDir, in.BinDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	const list = `{"cniVersion":"0.4.0","name":"k","plugins":[{"type":"bridge"}]}`
	if err := os.WriteFile(filepath.Join(in.ConfDir, "10-k.conflist"), []byte(list), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(in.PluginBinary, []byte("#!/bin/true\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Ensure(); err != nil {
		t.Fatal(err)
	}
	if ok, err := cni.Chained(in.ConfDir); !ok || err != nil {
		t.Fatalf("setup: chained %v, %v", ok, err)
	}

	startAgent(t, Config{Features: []Feature{}, CNI: CNIConfig{Unchain: cni.DirsList{{Conf: in.ConfDir, Bin: in.BinDir}}}})
	deadline := time.Now().Add(10 * time.Second)
	for {
		chained, err := cni.Chained(in.ConfDir)
		_, statErr := os.Stat(filepath.Join(in.BinDir, cni.PluginType))
		if err == nil && !chained && errors.Is(statErr, os.ErrNotExist) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 10s: chained %v (%v), binary stat %v", chained, err, statErr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
