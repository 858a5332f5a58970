package netpol

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestIDsSurviveRestart: a second agent loading the state file names the
// first agent's policy IDs, keeps them for the same policies and never
// hands a used ID to another policy.
func TestIDsSurviveRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "policy-ids.json")
	first, err := LoadIDs(path)
	if err != nil {
		t.Fatal(err)
	}
	a, b, c := first.Policy("x", "a"), first.Policy("x", "b"), first.Policy("y", "c")
	first.ReleasePolicy("y", "c")
	if err := first.Save(); err != nil {
		t.Fatal(err)
	}

	second, err := LoadIDs(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		id   uint32
		want string
	}{{a, "x/a"}, {b, "x/b"}, {c, "y/c"}} {
		if n, ok := second.PolicyName(tc.id); !ok || n != tc.want {
			t.Errorf("after restart, name of %d = %q %v, want %q", tc.id, n, ok, tc.want)
		}
	}
	if got := second.Policy("x", "b"); got != b {
		t.Errorf("x/b got ID %d after restart, had %d", got, b)
	}
	if d := second.Policy("z", "d"); d == a || d == b || d == c {
		t.Errorf("new policy got a used ID %d", d)
	}
	if got := second.Policy("y", "c"); got == c {
		t.Errorf("a deleted policy's ID %d was handed out again", got)
	}
}

func TestIDsSaveOnlyWhenChanged(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy-ids.json")
	ids, err := LoadIDs(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := ids.Save(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("nothing assigned, yet the file was written (%v)", err)
	}
	ids.Policy("x", "a")
	if err := ids.Save(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatal(err)
	}
}

func TestIDsBadFile(t *testing.T) {
	for _, tc := range []struct{ name, content, want string }{
		{"garbage", "{", "unexpected end"},
		{"future version", `{"version":2}`, "version 2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "policy-ids.json")
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := LoadIDs(path); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestIDsSaveError(t *testing.T) {
	blocker := filepath.Join(t.TempDir(), "state")
	ids, err := LoadIDs(filepath.Join(blocker, "policy-ids.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(blocker, nil, 0o600); err != nil { // the state dir is a file now
		t.Fatal(err)
	}
	ids.Policy("x", "a")
	if ids.Save() == nil || ids.Err() == nil {
		t.Fatal("save into a file's path worked")
	}
}

func TestIDsRetiredBounded(t *testing.T) {
	ids := NewIDs()
	first := ids.Policy("x", "p0")
	ids.ReleasePolicy("x", "p0")
	for i := range MaxRetiredPolicies {
		n := fmt.Sprintf("p%d", i+1)
		ids.Policy("x", n)
		ids.ReleasePolicy("x", n)
	}
	if _, ok := ids.PolicyName(first); ok {
		t.Errorf("the oldest deleted policy is still named after %d more deletions", MaxRetiredPolicies)
	}
}
