//go:build linux

package bpftest

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
)

// CgroupProg is a program attached at a cgroup, as bpftool shows it.
type CgroupProg struct {
	ID         int    `json:"id"`
	AttachType string `json:"attach_type"`
	Name       string `json:"name"`
}

// CgroupProgs lists the programs attached directly at cgroup, as bpftool
// (an independent reader of the kernel's state) sees them.
func CgroupProgs(tb testing.TB, cgroup string) []CgroupProg {
	tb.Helper()
	out, err := exec.Command("bpftool", "-j", "cgroup", "show", cgroup).Output()
	if err != nil {
		tb.Fatalf("bpftool cgroup show %s: %v", cgroup, err)
	}
	var progs []CgroupProg
	if s := strings.TrimSpace(string(out)); s != "" {
		if err := json.Unmarshal([]byte(s), &progs); err != nil {
			tb.Fatalf("parse bpftool output %q: %v", out, err)
		}
	}
	return progs
}
