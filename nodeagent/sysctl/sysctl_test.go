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

// The value from before the first change is what Restore puts back, once.
func TestEnsureRecordedRestore(t *testing.T) {
	root, records := t.TempDir(), filepath.Join(t.TempDir(), "sysctl")
	path := filepath.Join(root, TCPMigrateReq)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if done, err := Restore(root, records); err != nil || len(done) != 0 {
		t.Fatalf("Restore without records = %v, %v", done, err)
	}
	if _, changed, err := EnsureRecorded(root, TCPMigrateReq, "1", records); err != nil || !changed {
		t.Fatalf("EnsureRecorded: changed %v, err %v", changed, err)
	}
	// Someone sets 2, the next agent start sets 1 again: the record keeps 0.
	if err := os.WriteFile(path, []byte("2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := EnsureRecorded(root, TCPMigrateReq, "1", records); err != nil {
		t.Fatal(err)
	}
	done, err := Restore(root, records)
	if err != nil || len(done) != 1 || done[0] != "restored "+TCPMigrateReq+" to 0" {
		t.Fatalf("Restore = %q, %v", done, err)
	}
	if b, _ := os.ReadFile(path); string(b) != "0\n" {
		t.Fatalf("parameter holds %q after Restore, want 0", b)
	}
	if done, err := Restore(root, records); err != nil || len(done) != 0 {
		t.Fatalf("second Restore = %v, %v (the record must be gone)", done, err)
	}
}
