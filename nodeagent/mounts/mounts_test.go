//go:build linux

package mounts

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
)

func cleanupMounts(t *testing.T, path, fstype string) {
	t.Helper()
	t.Cleanup(func() {
		if _, err := Unmount(path, fstype); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
}

func TestEnsureBPFFSIdempotent(t *testing.T) {
	bpftest.RequireRoot(t)
	dir := filepath.Join(t.TempDir(), "bpf")
	cleanupMounts(t, dir, "bpf")

	for i, wantMounted := range []bool{true, false, false} {
		mounted, err := EnsureBPFFS(dir)
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		if mounted != wantMounted {
			t.Errorf("call %d: mounted = %v, want %v", i, mounted, wantMounted)
		}
	}
	mps, err := MountPoints(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(mps) != 1 || mps[0].FSType != "bpf" {
		t.Errorf("mounts at %s = %+v, want exactly one bpf", dir, mps)
	}
	if ok, err := IsBPFFS(dir); err != nil || !ok {
		t.Errorf("IsBPFFS = %v, %v", ok, err)
	}

	pinDir := filepath.Join(dir, "kubectl-ebpf")
	for range 2 {
		if err := EnsurePinDir(pinDir); err != nil {
			t.Fatal(err)
		}
	}
	if fi, err := os.Stat(pinDir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("pin dir: %v, %v (want mode 0700)", fi, err)
	}

	if n, err := Unmount(dir, "bpf"); err != nil || n != 1 {
		t.Errorf("Unmount = %d, %v; want 1, nil", n, err)
	}
}

func TestEnsurePinDirRejectsNonBPFFS(t *testing.T) {
	err := EnsurePinDir(filepath.Join(t.TempDir(), "kubectl-ebpf"))
	if err == nil {
		t.Fatal("EnsurePinDir on a non-bpffs succeeded, want an error")
	}
	t.Log(err)
}

func TestEnsureCgroup2Idempotent(t *testing.T) {
	bpftest.RequireRoot(t)
	dir := filepath.Join(t.TempDir(), "cgroupv2")
	cleanupMounts(t, dir, "cgroup2")

	tests := []struct {
		name        string
		ns          string
		wantMounted bool
	}{
		{name: "mount in own namespace", wantMounted: true},
		{name: "already mounted", wantMounted: false},
		{name: "already mounted, explicit namespace", ns: "/proc/self/ns/cgroup", wantMounted: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mounted, err := EnsureCgroup2(dir, tt.ns)
			if err != nil {
				t.Fatal(err)
			}
			if mounted != tt.wantMounted {
				t.Errorf("mounted = %v, want %v", mounted, tt.wantMounted)
			}
		})
	}
	if ok, err := IsCgroup2(dir); err != nil || !ok {
		t.Errorf("IsCgroup2 = %v, %v", ok, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err != nil {
		t.Errorf("cgroup2 root: %v", err)
	}
}

func TestEnsureCgroup2InNamespace(t *testing.T) {
	bpftest.RequireRoot(t)
	dir := filepath.Join(t.TempDir(), "cgroupv2")
	cleanupMounts(t, dir, "cgroup2")
	// Joining the namespace we are already in exercises the setns path.
	mounted, err := EnsureCgroup2(dir, "/proc/self/ns/cgroup")
	if err != nil || !mounted {
		t.Fatalf("EnsureCgroup2 = %v, %v; want true, nil", mounted, err)
	}
}

func TestUnescape(t *testing.T) {
	tests := []struct{ in, want string }{
		{`/plain`, `/plain`},
		{`/with\040space`, `/with space`},
		{`/tab\011x`, "/tab\tx"},
		{`/trailing\`, `/trailing\`},
		{`/bad\09x`, `/bad\09x`},
	}
	for _, tt := range tests {
		if got := unescape(tt.in); got != tt.want {
			t.Errorf("unescape(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
