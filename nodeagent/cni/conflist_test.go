package cni

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const bridgeList = `{
  "cniVersion": "0.4.0",
  "name": "kebpf",
  "plugins": [
    {"type": "bridge", "bridge": "kebpf0", "ipam": {"type": "host-local"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`

func setup(t *testing.T, files map[string]string) *Installer {
	t.Helper()
	root := t.TempDir()
	conf, bin := filepath.Join(root, "net.d"), filepath.Join(root, "bin")
	for _, d := range []string{conf, bin} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(conf, n), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	plugin := filepath.Join(root, "kebpf-cni-src")
	if err := os.WriteFile(plugin, []byte("#!/bin/true\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return &Installer{ConfDir: conf, BinDir: bin, PluginBinary: plugin,
		Entry: map[string]any{"socket": "/run/kubectl-ebpf/cni.sock", "enforcedMarker": "/sys/fs/bpf/x"}}
}

func pluginTypes(t *testing.T, path string) []string {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		Plugins []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var out []string
	for _, p := range c.Plugins {
		out = append(out, p["type"].(string))
	}
	return out
}

func TestEnsureChainsLastAndIsIdempotent(t *testing.T) {
	in := setup(t, map[string]string{"10-kebpf.conflist": bridgeList, "20-other.conflist": bridgeList})
	changed, err := in.Ensure()
	if err != nil || len(changed) != 2 {
		t.Fatalf("first Ensure: %v %v", changed, err)
	}
	primary := filepath.Join(in.ConfDir, "10-kebpf.conflist")
	if got := pluginTypes(t, primary); !slices.Equal(got, []string{"bridge", "portmap", PluginType}) {
		t.Fatalf("plugins %v", got)
	}
	if got := pluginTypes(t, filepath.Join(in.ConfDir, "20-other.conflist")); slices.Contains(got, PluginType) {
		t.Fatal("a config the runtime does not use was changed")
	}
	if b, err := os.ReadFile(filepath.Join(in.BinDir, PluginType)); err != nil || string(b) != "#!/bin/true\n" {
		t.Fatalf("binary: %q %v", b, err)
	}
	fi, _ := os.Stat(filepath.Join(in.BinDir, PluginType))
	if fi.Mode().Perm()&0o100 == 0 {
		t.Fatalf("binary not executable: %v", fi.Mode())
	}
	if changed, err := in.Ensure(); err != nil || len(changed) != 0 {
		t.Fatalf("second Ensure changed %v (err %v)", changed, err)
	}
	// Someone replaces the installed binary: it is put back.
	os.Remove(filepath.Join(in.BinDir, PluginType))
	os.WriteFile(filepath.Join(in.BinDir, PluginType), []byte("other"), 0o755)
	if changed, err := in.Ensure(); err != nil || len(changed) != 1 {
		t.Fatalf("after the binary was replaced: %v %v", changed, err)
	}
	if b, _ := os.ReadFile(filepath.Join(in.BinDir, PluginType)); string(b) != "#!/bin/true\n" {
		t.Fatalf("binary not restored: %q", b)
	}
	// The CNI rewrites its config (kindnet does on start): we come back.
	os.WriteFile(primary, []byte(bridgeList), 0o644)
	if changed, err := in.Ensure(); err != nil || len(changed) != 1 {
		t.Fatalf("after rewrite: %v %v", changed, err)
	}
	// New settings replace the entry in place, never a second one.
	in.Entry["socket"] = "/other.sock"
	if _, err := in.Ensure(); err != nil {
		t.Fatal(err)
	}
	if got := pluginTypes(t, primary); !slices.Equal(got, []string{"bridge", "portmap", PluginType}) {
		t.Fatalf("plugins after settings change %v", got)
	}
	if ok, err := Chained(in.ConfDir); !ok || err != nil {
		t.Fatalf("Chained = %v, %v", ok, err)
	}
	leftovers, _ := filepath.Glob(filepath.Join(in.ConfDir, "*kebpf-tmp"))
	if len(leftovers) > 0 {
		t.Fatalf("temporary files left: %v", leftovers)
	}

	done, err := Remove(in.ConfDir, in.BinDir)
	if err != nil || len(done) != 2 {
		t.Fatalf("Remove: %v %v", done, err)
	}
	if got := pluginTypes(t, primary); !slices.Equal(got, []string{"bridge", "portmap"}) {
		t.Fatalf("plugins after Remove %v", got)
	}
	if _, err := os.Stat(filepath.Join(in.BinDir, PluginType)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("binary left: %v", err)
	}
	if done, err := Remove(in.ConfDir, in.BinDir); err != nil || len(done) != 0 {
		t.Fatalf("second Remove: %v %v", done, err)
	}
}

func TestEnsureConvertsSingleConfAndRemoveRestoresIt(t *testing.T) {
	single := `{"cniVersion":"0.3.1","name":"ptp-net","type":"ptp","ipam":{"type":"host-local","subnet":"10.1.0.0/24"}}`
	in := setup(t, map[string]string{"10-ptp.conf": single})
	if _, err := in.Ensure(); err != nil {
		t.Fatal(err)
	}
	list := filepath.Join(in.ConfDir, "10-ptp.conflist")
	if got := pluginTypes(t, list); !slices.Equal(got, []string{"ptp", PluginType}) {
		t.Fatalf("plugins %v", got)
	}
	if _, err := os.Stat(filepath.Join(in.ConfDir, "10-ptp.conf")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("the .conf is still where the runtime would pick it before our list")
	}
	if p, err := primaryConfig(in.ConfDir); err != nil || p != list {
		t.Fatalf("primary %s %v", p, err)
	}
	if changed, err := in.Ensure(); err != nil || len(changed) != 0 {
		t.Fatalf("second Ensure: %v %v", changed, err)
	}
	if _, err := Remove(in.ConfDir, in.BinDir); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(in.ConfDir, "10-ptp.conf"))
	if err != nil || string(b) != single {
		t.Fatalf("original not restored byte for byte: %q %v", b, err)
	}
	entries, _ := os.ReadDir(in.ConfDir)
	if len(entries) != 1 {
		t.Fatalf("conf dir after Remove: %v", entries)
	}
}

func TestEnsureNoConfigAndBadConfig(t *testing.T) {
	in := setup(t, nil)
	if _, err := in.Ensure(); !errors.Is(err, ErrNoConfig) {
		t.Fatalf("empty dir: %v", err)
	}
	in.ConfDir = filepath.Join(in.ConfDir, "missing")
	if _, err := in.Ensure(); !errors.Is(err, ErrNoConfig) {
		t.Fatalf("missing dir: %v", err)
	}
	bad := setup(t, map[string]string{"10-bad.conflist": "{broken"})
	if _, err := bad.Ensure(); err == nil {
		t.Fatal("a broken config was accepted")
	}
	if b, _ := os.ReadFile(filepath.Join(bad.ConfDir, "10-bad.conflist")); string(b) != "{broken" {
		t.Fatal("a config we could not parse was rewritten")
	}
}

// Remove with one side empty leaves that side alone: the current install
// chains there (a stale pair that shares a dir with the current one).
func TestRemoveOneSide(t *testing.T) {
	for _, side := range []string{"conf only", "bin only"} {
		t.Run(side, func(t *testing.T) {
			in := setup(t, map[string]string{"10-kebpf.conflist": bridgeList})
			if _, err := in.Ensure(); err != nil {
				t.Fatal(err)
			}
			conf, bin := in.ConfDir, in.BinDir
			if side == "conf only" {
				bin = ""
			} else {
				conf = ""
			}
			if _, err := Remove(conf, bin); err != nil {
				t.Fatal(err)
			}
			chained, err := Chained(in.ConfDir)
			if err != nil {
				t.Fatal(err)
			}
			_, statErr := os.Stat(filepath.Join(in.BinDir, PluginType))
			if chained != (conf == "") || (statErr == nil) != (bin == "") {
				t.Errorf("after Remove(%q, %q): chained %v, binary stat %v", conf, bin, chained, statErr)
			}
		})
	}
}

func TestDirsListFlag(t *testing.T) {
	tests := []struct {
		in      string
		want    Dirs
		wantErr string
	}{
		{in: "/a/net.d:/a/bin", want: Dirs{Conf: "/a/net.d", Bin: "/a/bin"}},
		{in: "/a/net.d:", want: Dirs{Conf: "/a/net.d"}},
		{in: ":/a/bin", want: Dirs{Bin: "/a/bin"}},
		{in: ":", wantErr: "want CONF_DIR:BIN_DIR"},
		{in: "/a/net.d", wantErr: "want CONF_DIR:BIN_DIR"},
		{in: "net.d:/bin", wantErr: "not an absolute path"},
	}
	for _, tt := range tests {
		var l DirsList
		err := l.Set(tt.in)
		switch {
		case tt.wantErr != "":
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Set(%q) = %v, want error %q", tt.in, err, tt.wantErr)
			}
		case err != nil || len(l) != 1 || l[0] != tt.want:
			t.Errorf("Set(%q) = %v, %v; want %+v", tt.in, l, err, tt.want)
		case l.String() != tt.in:
			t.Errorf("String() = %q, want %q", l.String(), tt.in)
		}
	}
}
