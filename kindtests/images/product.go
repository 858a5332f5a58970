package images

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

// Product names the images of one build of the product.
type Product struct {
	Version       string
	AgentRef      string
	AgentTar      string
	TestServerRef string
	TestServerTar string
	// EnvoyRef is the Envoy image for the l7 feature (EnvoyRepository:
	// the Envoy version); install it with `kubectl ebpf install
	// --envoy-image EnvoyRef`, nodes without a registry cannot pull the
	// official one.
	EnvoyRef string
	EnvoyTar string
}

// Tarballs lists the image archives, for cluster.Provider.LoadImages.
func (p Product) Tarballs() []string { return []string{p.AgentTar, p.TestServerTar, p.EnvoyTar} }

// ModuleRoot is the directory of the product's go.mod, found through the go
// command so tests and tools work from any package directory.
func ModuleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("not inside the kubectl-ebpf module")
	}
	return filepath.Dir(gomod), nil
}

// SourceVersion is the version stamped into binaries and image tags built from
// the working tree: $KEBPF_VERSION, else the revision and modified state of
// the checkout, spelled as the Makefile's VERSION and a plain `go build` of
// the plugin spell it (manifests.RevisionVersion).
func SourceVersion(ctx context.Context, root string) string {
	if v := os.Getenv("KEBPF_VERSION"); v != "" {
		return v
	}
	git := func(args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, "git", args...)
		cmd.Dir = root
		out, err := cmd.Output()
		return strings.TrimSpace(string(out)), err
	}
	rev, err := git("rev-parse", "HEAD")
	if err != nil || rev == "" {
		return "dev"
	}
	status, err := git("status", "--porcelain")
	return manifests.RevisionVersion(rev, err != nil || status != "")
}

// LDFlags stamps version into the product's binaries.
func LDFlags(version string) string {
	return "-s -w -X github.com/kubectl-ebpf/kubectl-ebpf/manifests.Version=" + version
}

// GoBuild builds one main package of the module into out, statically, so the
// binary runs in an image with nothing else in it.
func GoBuild(ctx context.Context, root, pkg, out, version string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", LDFlags(version), "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

// BuildProduct builds the agent and test-server binaries and wraps each into
// a single-layer image archive under outDir, and an Envoy image from the
// Envoy binary .ci/deps installed (EnvoyBinary) and its shared libraries.
func BuildProduct(ctx context.Context, root, outDir, version string) (Product, error) {
	p := Product{
		Version:       version,
		AgentRef:      manifests.ImageRepository + ":" + version,
		AgentTar:      filepath.Join(outDir, "agent.tar"),
		TestServerRef: "localhost/kubectl-ebpf/testserver:" + version,
		TestServerTar: filepath.Join(outDir, "testserver.tar"),
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return p, err
	}
	envoy, envoyVersion, err := EnvoyBinary(ctx)
	if err != nil {
		return p, err
	}
	p.EnvoyRef, p.EnvoyTar = EnvoyRepository+":"+envoyVersion, filepath.Join(outDir, "envoy.tar")
	envoyFiles, err := envoyImageFiles(ctx, envoy)
	if err != nil {
		return p, fmt.Errorf("image %s: %w", p.EnvoyRef, err)
	}
	if err := BuildBinaryImage(ctx, p.EnvoyRef, envoyFiles, []string{EnvoyImagePath}, p.EnvoyTar); err != nil {
		return p, fmt.Errorf("image %s: %w", p.EnvoyRef, err)
	}
	if err := buildAgentImage(ctx, root, outDir, p.AgentRef, p.AgentTar, version); err != nil {
		return p, err
	}
	tsBin := filepath.Join(outDir, "kebpf-testserver")
	if err := GoBuild(ctx, root, "./kindtests/testserver", tsBin, version); err != nil {
		return p, err
	}
	// The test server answers `nslookup NAME` by its name too.
	files := map[string]string{"/usr/local/bin/kebpf-testserver": tsBin, "/usr/bin/nslookup": tsBin}
	if err := BuildBinaryImage(ctx, p.TestServerRef, files, []string{"/usr/local/bin/kebpf-testserver"}, p.TestServerTar); err != nil {
		return p, fmt.Errorf("image %s: %w", p.TestServerRef, err)
	}
	return p, nil
}

// buildAgentImage builds the agent image of the module at root: kebpf-agent,
// and kebpf-cni, which the agent copies into the node's CNI bin dir.
func buildAgentImage(ctx context.Context, root, outDir, ref, tar, version string) error {
	files := map[string]string{}
	for pkg, name := range map[string]string{"./nodeagent/cmd/kebpf-agent": "kebpf-agent", "./nodeagent/cmd/kebpf-cni": "kebpf-cni"} {
		bin := filepath.Join(outDir, name)
		if err := GoBuild(ctx, root, pkg, bin, version); err != nil {
			return err
		}
		files["/usr/local/bin/"+name] = bin
	}
	if err := BuildBinaryImage(ctx, ref, files, []string{"/usr/local/bin/kebpf-agent"}, tar); err != nil {
		return fmt.Errorf("image %s: %w", ref, err)
	}
	return nil
}
