package cluster

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// FindProcs lists the pids (other than this process) whose command line
// satisfies match: what the local provider's teardown and the Kubernetes
// build use to find processes of theirs that outlived the one that started
// them.
func FindProcs(match func(argv []string) bool) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		if match(strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")) {
			pids = append(pids, pid)
		}
	}
	return pids
}
