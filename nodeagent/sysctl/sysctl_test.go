package sysctl

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestEnsure(t *testing.T) {
	root := t.TempDir()
	path := filepath.Join(root, TCPMigrateReq)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	prev, changed, err := Ensure(root, TCPMigrateReq, "1")
	if err != nil || prev != "0" || !changed {
		t.Fatalf("Ensure = %q, %v, %v; want \"0\", true, nil", prev, changed, err)
	}
	if b, _ := os.ReadFile(path); string(b) != "1\n" {
		t.Fatalf("file holds %q after Ensure", b)
	}
	// Already set: nothing is written (a read-only file would refuse it).
	if err := os.Chmod(path, 0o444); err != nil {
		t.Fatal(err)
	}
	if prev, changed, err := Ensure(root, TCPMigrateReq, "1"); err != nil || prev != "1" || changed {
		t.Fatalf("second Ensure = %q, %v, %v; want \"1\", false, nil", prev, changed, err)
	}
	if _, _, err := Ensure(root, "net/ipv4/no_such_parameter", "1"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing parameter: err %v, want os.ErrNotExist", err)
	}
}
