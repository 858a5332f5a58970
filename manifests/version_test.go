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
		name string
		bi   *debug.BuildInfo
		want [3]string
	}{
		{name: "no build info", bi: nil, want: [3]string{"dev", "", SourceNone}},
		{name: "go build in a clean checkout", bi: &debug.BuildInfo{Main: debug.Module{Version: "v0.0.0-20261206024229-96cb62e1a2b3"}, Settings: vcs("false")}, want: [3]string{"96cb62e1a2b3", rev, SourceVCS}},
		{name: "go build in a modified checkout", bi: &debug.BuildInfo{Main: debug.Module{Version: "v0.0.0-20261206024229-96cb62e1a2b3+dirty"}, Settings: vcs("true")}, want: [3]string{"96cb62e1a2b3-dirty", rev, SourceVCS}},
		{name: "tagged checkout: still the revision make tags", bi: &debug.BuildInfo{Main: debug.Module{Version: "v1.2.3"}, Settings: vcs("false")}, want: [3]string{"96cb62e1a2b3", rev, SourceVCS}},
		{name: "go install pkg@v1.2.3", bi: &debug.BuildInfo{Main: debug.Module{Version: "v1.2.3"}}, want: [3]string{"v1.2.3", "", SourceModule}},
		{name: "module version with build metadata", bi: &debug.BuildInfo{Main: debug.Module{Version: "v2.0.0+incompatible"}}, want: [3]string{"v2.0.0-incompatible", "", SourceModule}},
		{name: "-buildvcs=false", bi: &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}}, want: [3]string{"dev", "", SourceNone}},
		{name: "test binary", bi: &debug.BuildInfo{}, want: [3]string{"dev", "", SourceNone}},
	}
	for _, tt := range tests {
		var got [3]string // version, commit, source
		got[0], got[1], got[2] = FromBuildInfo(tt.bi)
		if got != tt.want {
			t.Errorf("%s: FromBuildInfo = %q, want %q", tt.name, got, tt.want)
		}
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
