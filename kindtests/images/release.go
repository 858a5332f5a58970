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

// Release is an earlier build of the product, for upgrade and downgrade
// tests: its plugin binary and its agent image, built from the module's
// own git history.
type Release struct {
	Commit, Version string
	// Plugin is its kubectl-ebpf binary; it installs AgentRef by default.
	Plugin   string
	AgentRef string
	AgentTar string
}

// BuildRelease builds the plugin and agent image of commit, from the
// repository at root (git archive: no worktree, the checkout is left
// alone), under cacheDir/releases/<commit>; a finished build is reused.
func BuildRelease(ctx context.Context, root, commit, cacheDir string) (Release, error) {
	git := func(args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, "git", args...)
		cmd.Dir = root
		out, err := cmd.Output()
		if ee, ok := err.(*exec.ExitError); ok {
			err = fmt.Errorf("%w: %s", err, strings.TrimSpace(string(ee.Stderr)))
		}
		return strings.TrimSpace(string(out)), err
	}
	full, err := git("rev-parse", "--verify", "--quiet", commit+"^{commit}")
	if err != nil {
		return Release{}, fmt.Errorf("release %s is not in this repository's history (a shallow clone? git fetch --unshallow): %w", commit, err)
	}
	version := full[:12]
	dir := filepath.Join(cacheDir, "releases", full)
	r := Release{Commit: full, Version: version, Plugin: filepath.Join(dir, "kubectl-ebpf"),
		AgentRef: manifests.ImageRepository + ":" + version, AgentTar: filepath.Join(dir, "agent.tar")}
	done := filepath.Join(dir, "done")
	if _, err := os.Stat(done); err == nil {
		return r, nil
	}
	src := filepath.Join(dir, "src")
	if err := os.RemoveAll(dir); err != nil {
		return r, err
	}
	if err := os.MkdirAll(src, 0o755); err != nil {
		return r, err
	}
	archive := exec.CommandContext(ctx, "sh", "-c", `git archive --format=tar "$1" | tar -x -C "$2"`, "sh", full, src)
	archive.Dir = root
	if out, err := archive.CombinedOutput(); err != nil {
		return r, fmt.Errorf("git archive %s: %w\n%s", full, err, out)
	}
	if err := GoBuild(ctx, src, "./plugin/cmd/kubectl-ebpf", r.Plugin, version); err != nil {
		return r, err
	}
	if err := buildAgentImage(ctx, src, dir, r.AgentRef, r.AgentTar, version); err != nil {
		return r, err
	}
	if err := os.RemoveAll(src); err != nil {
		return r, err
	}
	return r, os.WriteFile(done, []byte(full+"\n"), 0o644)
}
