package manifests

import (
	"runtime/debug"
	"testing"
)

func TestFromBuildInfo(t *testing.T) {
	const rev = "96cb62e1a2b3c4d5e6f708192a3b4c5d6e7f8091"
	vcs := func(modified string) []debug.BuildSetting {
		return []debug.BuildSetting{{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: modified}}
	}
	tests := []struct {
		name                         string
		bi                           *debug.BuildInfo
		wantVersion, wantCommit, src string
	}{
		{name: "no build info", bi: nil, wantVersion: "dev", src: SourceNone},
		{name: "go build in a clean checkout", bi: &debug.BuildInfo{Main: debug.Module{Version: "v0.0.0-20261206024229-96cb62e1a2b3"}, Settings: vcs("false")},
			wantVersion: "96cb62e1a2b3", wantCommit: rev, src: SourceVCS},
		{name: "go build in a modified checkout", bi: &debug.BuildInfo{Main: debug.Module{Version: "v0.0.0-20261206024229-96cb62e1a2b3+dirty"}, Settings: vcs("true")},
			wantVersion: "96cb62e1a2b3-dirty", wantCommit: rev, src: SourceVCS},
		{name: "tagged checkout: still the revision make tags", bi: &debug.BuildInfo{Main: debug.Module{Version: "v1.2.3"}, Settings: vcs("false")},
			wantVersion: "96cb62e1a2b3", wantCommit: rev, src: SourceVCS},
		{name: "go install pkg@v1.2.3", bi: &debug.BuildInfo{Main: debug.Module{Version: "v1.2.3"}},
			wantVersion: "v1.2.3", src: SourceModule},
		{name: "module version with build metadata", bi: &debug.BuildInfo{Main: debug.Module{Version: "v2.0.0+incompatible"}},
			wantVersion: "v2.0.0-incompatible", src: SourceModule},
		{name: "-buildvcs=false", bi: &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}},
			wantVersion: "dev", src: SourceNone},
		{name: "test binary", bi: &debug.BuildInfo{}, wantVersion: "dev", src: SourceNone},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, c, s := FromBuildInfo(tt.bi)
			if v != tt.wantVersion || c != tt.wantCommit || s != tt.src {
				t.Errorf("FromBuildInfo = %q, %q, %q; want %q, %q, %q", v, c, s, tt.wantVersion, tt.wantCommit, tt.src)
			}
		})
	}
}

func TestRevisionVersion(t *testing.T) {
	for _, tt := range []struct {
		rev      string
		modified bool
		want     string
	}{
		{"96cb62e1a2b3c4d5e6f708192a3b4c5d6e7f8091", false, "96cb62e1a2b3"},
		{"96cb62e1a2b3c4d5e6f708192a3b4c5d6e7f8091", true, "96cb62e1a2b3-dirty"},
		{"96cb62e", false, "96cb62e"},
	} {
		if got := RevisionVersion(tt.rev, tt.modified); got != tt.want {
			t.Errorf("RevisionVersion(%q, %t) = %q, want %q", tt.rev, tt.modified, got, tt.want)
		}
	}
}
