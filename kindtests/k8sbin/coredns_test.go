package k8sbin

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The wrapper module and the constant must name one release: the stamp (and
// so the cache) is keyed by the constant, the binary by go.mod.
func TestCoreDNSWrapperPinsVersion(t *testing.T) {
	dir, err := CoreDNSSourceDir()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	// `require github.com/coredns/coredns vX` on one line or in a block.
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(strings.TrimPrefix(strings.TrimSpace(l), "require "))
		if len(f) >= 2 && f[0] == coreDNSPackage {
			if f[1] != CoreDNSVersion {
				t.Fatalf("kindtests/corednsbuild requires %s %s, CoreDNSVersion is %s", f[0], f[1], CoreDNSVersion)
			}
			return
		}
	}
	t.Fatalf("kindtests/corednsbuild/go.mod does not require %s", coreDNSPackage)
}
