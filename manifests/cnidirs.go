package manifests

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
)

// CNIDirs is one pair of a node's CNI directories kebpf-cni was chained
// into (Conf) and installed into (Bin).
type CNIDirs struct {
	Conf string `json:"conf"`
	Bin  string `json:"bin"`
}

// AnnotationCNIDirs on the agent DaemonSet records, as a JSON list, every
// pair of CNI dirs an install of this cluster chained kebpf-cni into. The
// cluster remembers where the plugin went, so an install that chains
// elsewhere or not at all, and uninstall, take it out of every one of them
// whatever the current flags say.
const AnnotationCNIDirs = "kubectl-ebpf.io/cni-dirs"

// CNIStaleMount is where the agent mounts the i-th stale pair's dirs.
func CNIStaleMount(i int) CNIDirs {
	base := fmt.Sprintf("/host/cni-stale/%d", i)
	return CNIDirs{Conf: base + "/net.d", Bin: base + "/bin"}
}

// CNIChained is the pair this install chains into, nil with NoCNIChaining.
// Call after Objects defaulted the dirs.
func (o RenderOptions) CNIChained() *CNIDirs {
	if o.NoCNIChaining {
		return nil
	}
	return &CNIDirs{Conf: o.CNIConfDir, Bin: o.CNIBinDir}
}

// CNIRecord is what the DaemonSet's AnnotationCNIDirs holds after this
// install: the history plus the current pair, without repeats, sorted.
func (o RenderOptions) CNIRecord() []CNIDirs {
	out := slices.Clone(o.CNIHistory)
	if c := o.CNIChained(); c != nil {
		out = append(out, *c)
	}
	slices.SortFunc(out, func(a, b CNIDirs) int { return strings.Compare(a.Conf+"\x00"+a.Bin, b.Conf+"\x00"+b.Bin) })
	return slices.Compact(out)
}

// CNIRecordJSON is CNIRecord as the annotation's value.
func (o RenderOptions) CNIRecordJSON() (string, error) {
	rec := o.CNIRecord()
	if rec == nil {
		rec = []CNIDirs{} // "[]": nothing chained, not "unknown"
	}
	b, err := json.Marshal(rec)
	return string(b), err
}

// CNIStale are the pairs the agent takes kebpf-cni out of at start: the
// record without the current pair. A side shared with the current pair is
// left empty, since the agent chains there itself.
func (o RenderOptions) CNIStale() []CNIDirs {
	cur := o.CNIChained()
	var out []CNIDirs
	for _, d := range o.CNIRecord() {
		if cur != nil {
			if d == *cur {
				continue
			}
			if d.Conf == cur.Conf {
				d.Conf = ""
			}
			if d.Bin == cur.Bin {
				d.Bin = ""
			}
		}
		out = append(out, d)
	}
	return out
}

// ParseCNIRecord reads an AnnotationCNIDirs value; every path must be an
// absolute, clean host path (the annotation can be edited by hand).
func ParseCNIRecord(s string) ([]CNIDirs, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var out []CNIDirs
	if err := json.Unmarshal([]byte(s), &out); err != nil {
		return nil, fmt.Errorf("annotation %s: %w", AnnotationCNIDirs, err)
	}
	for _, d := range out {
		if err := validHostDir("CNI conf dir in annotation "+AnnotationCNIDirs, d.Conf); err != nil {
			return nil, err
		}
		if err := validHostDir("CNI bin dir in annotation "+AnnotationCNIDirs, d.Bin); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// CNIRecordOf is every pair of CNI dirs the agent DaemonSet ds (as
// installed, nil when there is none) chained kebpf-cni into: its
// annotation plus the dirs its cni-conf/cni-bin volumes mount (a DaemonSet
// of a release before the annotation has only those). An unreadable
// annotation is returned as the error beside what could be read.
func CNIRecordOf(ds *appsv1.DaemonSet) ([]CNIDirs, error) {
	if ds == nil {
		return nil, nil
	}
	out, err := ParseCNIRecord(ds.Annotations[AnnotationCNIDirs])
	var d CNIDirs
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.HostPath == nil {
			continue
		}
		switch v.Name {
		case CNIConfVolume:
			d.Conf = v.HostPath.Path
		case CNIBinVolume:
			d.Bin = v.HostPath.Path
		}
	}
	if d.Conf != "" && d.Bin != "" && !slices.Contains(out, d) {
		out = append(out, d)
	}
	return out, err
}
