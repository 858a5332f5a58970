package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
)

// Chaining into the node's CNI configuration, the way Istio's and
// Linkerd's CNI installers do it: the runtime uses the first config file of
// the conf dir in lexical order (libcni's rule), so our entry goes last in
// that file's plugin list. A single-plugin .conf is converted to a
// .conflist and the original kept beside it under a name libcni ignores, so
// Remove can restore it byte for byte. The agent calls Ensure periodically:
// a CNI that rewrites its config (kindnet does on start) gets our entry back
// within one period.

// ErrNoConfig: the conf dir has no CNI config yet (the pod network's own
// agent has not written it); Ensure is retried.
var ErrNoConfig = errors.New("no CNI network config in conf dir yet")

// backupExt marks a .conf we converted; libcni only reads .conf, .conflist
// and .json.
const backupExt = ".kebpf-orig"

var confExts = []string{".conf", ".conflist", ".json"}

// Installer puts kebpf-cni into a node's CNI configuration.
type Installer struct {
	ConfDir, BinDir string
	// PluginBinary is the kebpf-cni executable copied into BinDir.
	PluginBinary string
	// Entry holds our plugin's settings (socket, enforcedMarker, ...);
	// "type" is added.
	Entry map[string]any

	binary   []byte      // PluginBinary's bytes, read once
	verified os.FileInfo // the installed binary when it last matched
}

// Ensure installs the binary when it differs and our entry in the primary
// config when missing or different. It reports what it changed.
func (in *Installer) Ensure() ([]string, error) {
	var changed []string
	if in.PluginBinary != "" {
		if in.binary == nil {
			b, err := os.ReadFile(in.PluginBinary)
			if err != nil {
				return nil, fmt.Errorf("read plugin binary: %w", err)
			}
			in.binary = b
		}
		dst := filepath.Join(in.BinDir, PluginType)
		// Every period: read the installed binary back only when it changed
		// on disk since it last matched.
		if fi, err := os.Stat(dst); err != nil || in.verified == nil || !sameFile(fi, in.verified) {
			ok, err := copyIfDifferent(in.binary, dst)
			if err != nil {
				return nil, err
			}
			if ok {
				changed = append(changed, "installed "+dst)
			}
			in.verified, _ = os.Stat(dst)
		}
	}
	path, err := primaryConfig(in.ConfDir)
	if err != nil {
		return changed, err
	}
	entry := map[string]any{"type": PluginType}
	for k, v := range in.Entry {
		entry[k] = v
	}
	entry, err = roundTrip(entry)
	if err != nil {
		return changed, err
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return changed, err
	}
	var conf map[string]any
	if err := json.Unmarshal(raw, &conf); err != nil {
		return changed, fmt.Errorf("parse %s: %w", path, err)
	}
	plugins, isList := conf["plugins"].([]any)
	if !isList {
		// A single-plugin config: becomes a list of it and us.
		single := map[string]any{}
		for k, v := range conf {
			if k != "cniVersion" && k != "name" {
				single[k] = v
			}
		}
		list := map[string]any{"cniVersion": conf["cniVersion"], "name": conf["name"], "plugins": []any{single, entry}}
		target := strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
		if err := writeJSON(target, list); err != nil {
			return changed, err
		}
		if err := os.Rename(path, path+backupExt); err != nil {
			os.Remove(target)
			return changed, fmt.Errorf("keep original %s: %w", path, err)
		}
		return append(changed, fmt.Sprintf("chained into %s (converted from %s, original kept as %s)", target, filepath.Base(path), filepath.Base(path)+backupExt)), nil
	}
	i := slices.IndexFunc(plugins, isOurs)
	switch {
	case i < 0:
		plugins = append(plugins, entry)
	case i == len(plugins)-1 && reflect.DeepEqual(plugins[i], any(entry)):
		return changed, nil
	default:
		// Different settings, or someone moved us: one entry, last.
		plugins = append(slices.Delete(plugins, i, i+1), entry)
	}
	conf["plugins"] = plugins
	if err := writeJSON(path, conf); err != nil {
		return changed, err
	}
	return append(changed, "chained into "+path), nil
}

// Remove takes our entry out of every config in confDir (restoring a .conf
// we converted) and deletes the plugin binary from binDir. Missing dirs are
// not an error; an empty one is left alone. It reports what it removed.
func Remove(confDir, binDir string) ([]string, error) {
	var done []string
	var errs []error
	var entries []os.DirEntry
	if confDir != "" {
		var err error
		entries, err = os.ReadDir(confDir)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
	}
	for _, e := range entries {
		name := e.Name()
		path := filepath.Join(confDir, name)
		if strings.HasSuffix(name, backupExt) {
			orig := strings.TrimSuffix(path, backupExt)
			converted := strings.TrimSuffix(orig, filepath.Ext(orig)) + ".conflist"
			if err := os.Remove(converted); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
				continue
			}
			if err := os.Rename(path, orig); err != nil {
				errs = append(errs, err)
				continue
			}
			done = append(done, "restored "+orig)
			continue
		}
		if e.IsDir() || !slices.Contains(confExts, filepath.Ext(name)) {
			continue
		}
		raw, err := os.ReadFile(path)
		if errors.Is(err, os.ErrNotExist) {
			continue // the list we converted to, removed by its restore
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var conf map[string]any
		if json.Unmarshal(raw, &conf) != nil {
			continue // not ours to judge
		}
		plugins, ok := conf["plugins"].([]any)
		if !ok || !slices.ContainsFunc(plugins, isOurs) {
			continue
		}
		conf["plugins"] = slices.DeleteFunc(plugins, isOurs)
		if err := writeJSON(path, conf); err != nil {
			errs = append(errs, err)
			continue
		}
		done = append(done, "unchained from "+path)
	}
	if binDir == "" {
		return done, errors.Join(errs...)
	}
	bin := filepath.Join(binDir, PluginType)
	if err := os.Remove(bin); err == nil {
		done = append(done, "removed "+bin)
	} else if !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return done, errors.Join(errs...)
}

// Chained reports whether the primary config of confDir carries our entry.
func Chained(confDir string) (bool, error) {
	path, err := primaryConfig(confDir)
	if err != nil {
		return false, err
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return false, err
	}
	var conf struct {
		Plugins []any `json:"plugins"`
	}
	if err := json.Unmarshal(raw, &conf); err != nil {
		return false, fmt.Errorf("parse %s: %w", path, err)
	}
	return slices.ContainsFunc(conf.Plugins, isOurs), nil
}

func isOurs(p any) bool {
	m, ok := p.(map[string]any)
	return ok && m["type"] == PluginType
}

// primaryConfig is the config file the runtime uses: the first by name
// with a CNI extension.
func primaryConfig(dir string) (string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("%w (%s does not exist)", ErrNoConfig, dir)
		}
		return "", err
	}
	for _, e := range entries { // sorted by name
		if !e.IsDir() && slices.Contains(confExts, filepath.Ext(e.Name())) {
			return filepath.Join(dir, e.Name()), nil
		}
	}
	return "", fmt.Errorf("%w (%s)", ErrNoConfig, dir)
}

func roundTrip(m map[string]any) (map[string]any, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	var out map[string]any
	return out, json.Unmarshal(b, &out)
}

// writeJSON replaces path atomically; the temporary name has no CNI
// extension, so the runtime never reads a half-written file.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return writeAtomic(path, append(b, '\n'), 0o644)
}

func writeAtomic(path string, b []byte, mode os.FileMode) error {
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".kebpf-tmp")
	if err := os.WriteFile(tmp, b, mode); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := os.Chmod(tmp, mode); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("replace %s: %w", path, err)
	}
	return nil
}

func sameFile(a, b os.FileInfo) bool {
	return os.SameFile(a, b) && a.Size() == b.Size() && a.ModTime().Equal(b.ModTime())
}

// copyIfDifferent installs want at dst (atomically, executable) unless dst
// already has the same bytes.
func copyIfDifferent(want []byte, dst string) (bool, error) {
	if have, err := os.ReadFile(dst); err == nil && bytes.Equal(have, want) {
		return false, nil
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return false, err
	}
	return true, writeAtomic(dst, want, 0o755)
}

// Dirs is a pair of CNI dirs as the agent sees them, an earlier install's
// (--cni-unchain): Remove takes kebpf-cni out of them. An empty side is
// left alone: it is where the current install chains.
type Dirs struct{ Conf, Bin string }

func (d Dirs) String() string { return d.Conf + ":" + d.Bin }

// DirsList is a repeatable CONF_DIR:BIN_DIR flag.
type DirsList []Dirs

func (l *DirsList) String() string {
	var parts []string
	for _, d := range *l {
		parts = append(parts, d.String())
	}
	return strings.Join(parts, ",")
}

// Set parses one CONF_DIR:BIN_DIR; either side may be empty, not both,
// and a given side must be an absolute path.
func (l *DirsList) Set(s string) error {
	conf, bin, ok := strings.Cut(s, ":")
	if !ok || (conf == "" && bin == "") {
		return fmt.Errorf("%q: want CONF_DIR:BIN_DIR (one side may be empty)", s)
	}
	for _, p := range []string{conf, bin} {
		if p != "" && !filepath.IsAbs(p) {
			return fmt.Errorf("%q: %q is not an absolute path", s, p)
		}
	}
	*l = append(*l, Dirs{Conf: conf, Bin: bin})
	return nil
}

func (l *DirsList) Type() string { return "confDir:binDir" }
