//go:build linux

package bench

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// TestMain lets the test binary serve as the harness's child processes
// (backend server, client worker, socket-LB agent), as kebpf-bench does.
func TestMain(m *testing.M) {
	if Child() {
		return
	}
	os.Exit(m.Run())
}

// requireRoot gates a test of the root tier: under -short (the unit tier) it
// skips saying what it needs; without -short it fails when not root, since
// this tier runs as root on every machine we test on.
func requireRoot(t *testing.T, needs string) {
	t.Helper()
	if testing.Short() {
		t.Skip("root tier, skipped under -short: needs " + needs)
	}
	if os.Geteuid() != 0 {
		t.Fatal("needs root (" + needs + "): run make root as root")
	}
}

// requireTools fails when a tool `make deps` installs is missing.
func requireTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed: run make deps", tool)
		}
	}
}

// runClean runs the harness with the test's log and checks that the run
// created an environment (id names it) and left nothing of it on the host.
func runClean(t *testing.T, ctx context.Context, o Options) (res *Results, id string) {
	t.Helper()
	o.Log = slog.New(slog.NewTextHandler(testWriter{t}, nil))
	o.OnEnv = func(s string) { id = s }
	res, err := Run(ctx, o)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	if id == "" {
		t.Fatal("no environment was created")
	}
	if left := Leftovers(id); len(left) > 0 {
		t.Errorf("left behind after the run:\n%v", left)
	}
	return res, id
}

// checkMarkdown fails for every wanted string md lacks and every unwanted
// one it holds.
func checkMarkdown(t *testing.T, md string, want, unwanted []string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(md, w) {
			t.Errorf("markdown lacks %q:\n%s", w, md)
		}
	}
	for _, u := range unwanted {
		if strings.Contains(md, u) {
			t.Errorf("markdown holds %q:\n%s", u, md)
		}
	}
}

// checkPoint fails for a point that is missing (ok false), n/a, or without
// numbers from each of rounds rounds, and says whether its numbers are there
// to be checked further.
func checkPoint(t *testing.T, what string, ok bool, na string, withNumbers, samples, rounds int) bool {
	t.Helper()
	switch {
	case !ok:
		t.Errorf("%s: no measurement", what)
	case na != "":
		t.Errorf("%s: n/a: %s", what, na)
	case samples != rounds || withNumbers != rounds:
		t.Errorf("%s: want %d rounds with numbers, got %d of %d", what, rounds, withNumbers, samples)
	default:
		return true
	}
	return false
}

// checkRotation fails unless sample r of col was measured in round r at
// col's place in that round's rotated order of cols.
func checkRotation[S sample](t *testing.T, what string, cols []string, col string, ss []S) {
	t.Helper()
	for r, s := range ss {
		if want := slices.Index(rotation(cols, r), col); s.place().Round != r || s.place().Slot != want {
			t.Errorf("%s sample %d: round %d slot %d, want round %d slot %d", what, r, s.place().Round, s.place().Slot, r, want)
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p))
	return len(p), nil
}
