package manifests

import (
	"runtime/debug"
	"strings"
)

// Version is the release of the plugin and of the agent image it installs.
// `make` and the image builder set it with
// -ldflags -X github.com/kubectl-ebpf/kubectl-ebpf/manifests.Version=...;
// left empty (a plain `go build` or `go install`), it is derived from the
// build info at start-up, so the default image is the one `make` builds for
// the same revision.
var Version = ""

// GitCommit is the source revision: set with -ldflags -X like Version, or
// the VCS revision from the build info.
var GitCommit = ""

// VersionSource says where Version came from (one of the Source* values).
var VersionSource = ""

// Where Version came from.
const (
	// SourceLDFlags: -ldflags -X at link time (make, the image builder).
	SourceLDFlags = "ldflags"
	// SourceVCS: the VCS revision Go stamps into a build in a git checkout.
	SourceVCS = "vcs"
	// SourceModule: the module version of `go install ...@vX`.
	SourceModule = "module"
	// SourceNone: nothing known (e.g. GOFLAGS=-buildvcs=false); Version is "dev".
	SourceNone = "none"
)

// ImageRepository is the agent image without its tag.
const ImageRepository = "localhost/kubectl-ebpf/agent"

// DefaultImage is the agent image matching this build.
func DefaultImage() string { return ImageRepository + ":" + Version }

func init() {
	if Version != "" {
		VersionSource = SourceLDFlags
		return
	}
	bi, _ := debug.ReadBuildInfo()
	var commit string
	Version, commit, VersionSource = FromBuildInfo(bi)
	if GitCommit == "" {
		GitCommit = commit
	}
}

// RevisionLen is how many hex digits of the commit a version carries.
const RevisionLen = 12

// RevisionVersion is the version of a build from source at revision, with
// "-dirty" when the working tree had changes (as `git status --porcelain`
// reports them, untracked files included, the way Go sets vcs.modified).
// The Makefile and kindtests/images spell the same for the image tag.
func RevisionVersion(revision string, modified bool) string {
	v := revision[:min(len(revision), RevisionLen)]
	if modified {
		v += "-dirty"
	}
	return v
}

// FromBuildInfo derives version, commit and source from the build info of
// a binary built without -ldflags: the VCS revision when Go stamped one (a
// build in a checkout), else the module version (`go install pkg@vX`),
// else "dev".
func FromBuildInfo(bi *debug.BuildInfo) (version, commit, source string) {
	if bi == nil {
		return "dev", "", SourceNone
	}
	var revision string
	var modified bool
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			revision = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	if revision != "" {
		// Go 1.24+ also stamps a pseudo-version from the same revision into
		// Main.Version; the revision is what make tags the image with.
		return RevisionVersion(revision, modified), revision, SourceVCS
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		// '+' (e.g. +incompatible, +dirty) is not allowed in an image tag.
		return strings.ReplaceAll(v, "+", "-"), "", SourceModule
	}
	return "dev", "", SourceNone
}
