package cluster

import (
	"os"
	"os/exec"
	"slices"
	"testing"
)

func TestFindProcs(t *testing.T) {
	cmd := exec.Command("sleep", "30.123")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	got := FindProcs(func(argv []string) bool { return slices.Equal(argv, []string{"sleep", "30.123"}) })
	if !slices.Equal(got, []int{cmd.Process.Pid}) {
		t.Errorf("FindProcs = %v, want [%d]", got, cmd.Process.Pid)
	}
	if self := FindProcs(func([]string) bool { return true }); slices.Contains(self, os.Getpid()) {
		t.Errorf("FindProcs lists this process")
	}
}
