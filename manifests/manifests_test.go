package manifests

import (
	"fmt"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

func TestObjectsLabelledAndImageSubstituted(t *testing.T) {
	tests := []struct {
		name      string
		opts      RenderOptions
		wantImage string
	}{
		{name: "default image", opts: RenderOptions{}, wantImage: DefaultImage()},
		{name: "override", opts: RenderOptions{Image: "example.test/agent:v9", Version: "v9"}, wantImage: "example.test/agent:v9"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs, err := Objects(tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			kinds := map[string]int{}
			for _, o := range objs {
				kinds[o.GetKind()]++
				for k, v := range CommonLabels() {
					if got := o.GetLabels()[k]; got != v {
						t.Errorf("%s/%s label %s = %q, want %q", o.GetKind(), o.GetName(), k, got, v)
					}
				}
				if ns := o.GetNamespace(); ns != "" && ns != Namespace {
					t.Errorf("%s/%s in namespace %q", o.GetKind(), o.GetName(), ns)
				}
				// Every object must survive a YAML round trip (what -o yaml prints).
				b, err := yaml.Marshal(o.Object)
				if err != nil {
					t.Fatal(err)
				}
				var back map[string]any
				if err := yaml.Unmarshal(b, &back); err != nil {
					t.Fatalf("%s: %v", o.GetName(), err)
				}
				if strings.Contains(string(b), "{{") {
					t.Errorf("%s/%s has an unrendered template", o.GetKind(), o.GetName())
				}
			}
			// Two CRDs: L7Policy and NodeState.
			for k, n := range map[string]int{"Namespace": 1, "CustomResourceDefinition": 2, "ServiceAccount": 1, "ClusterRole": 1, "ClusterRoleBinding": 1, "Role": 1, "RoleBinding": 1, "ValidatingAdmissionPolicy": 1, "ValidatingAdmissionPolicyBinding": 1, "ConfigMap": 1, "DaemonSet": 1} {
				if kinds[k] != n {
					t.Errorf("kind %s appears %d times, want %d", k, kinds[k], n)
				}
			}
			if objs[0].GetKind() != "Namespace" || objs[1].GetKind() != "CustomResourceDefinition" {
				t.Errorf("apply order starts with %s, %s", objs[0].GetKind(), objs[1].GetKind())
			}
			ds := find(t, objs, "DaemonSet")
			tl, _, _ := unstructured.NestedStringMap(ds.Object, "spec", "template", "metadata", "labels")
			for k, v := range CommonLabels() {
				if tl[k] != v {
					t.Errorf("pod template label %s = %q", k, tl[k])
				}
			}
			for _, path := range [][]string{{"spec", "template", "spec", "containers"}, {"spec", "template", "spec", "initContainers"}} {
				cs, _, _ := unstructured.NestedSlice(ds.Object, path...)
				if len(cs) == 0 {
					t.Fatalf("no %s", path[len(path)-1])
				}
				for _, c := range cs {
					if img := c.(map[string]any)["image"]; img != tt.wantImage {
						t.Errorf("%s image = %v, want %s", path[len(path)-1], img, tt.wantImage)
					}
				}
			}
		})
	}
}

func TestDaemonSetSecurity(t *testing.T) {
	objs, err := Objects(RenderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ds := find(t, objs, "DaemonSet")
	spec, _, _ := unstructured.NestedMap(ds.Object, "spec", "template", "spec")
	if spec["hostNetwork"] != true || spec["dnsPolicy"] != "ClusterFirstWithHostNet" || spec["priorityClassName"] != "system-node-critical" {
		t.Errorf("pod spec basics wrong: %v %v %v", spec["hostNetwork"], spec["dnsPolicy"], spec["priorityClassName"])
	}
	agent := spec["containers"].([]any)[0].(map[string]any)
	sc := agent["securityContext"].(map[string]any)
	if sc["privileged"] != false {
		t.Errorf("agent container privileged = %v", sc["privileged"])
	}
	if sc["allowPrivilegeEscalation"] != false || sc["readOnlyRootFilesystem"] != true {
		t.Errorf("agent container: allowPrivilegeEscalation %v, readOnlyRootFilesystem %v", sc["allowPrivilegeEscalation"], sc["readOnlyRootFilesystem"])
	}
	if sp, _ := sc["seccompProfile"].(map[string]any); sp["type"] != "RuntimeDefault" {
		t.Errorf("agent container seccompProfile = %v, want RuntimeDefault", sc["seccompProfile"])
	}
	if drop, _ := sc["capabilities"].(map[string]any)["drop"].([]any); len(drop) != 1 || drop[0] != "ALL" {
		t.Errorf("agent container drops %v, want [ALL]", drop)
	}
	caps := sc["capabilities"].(map[string]any)["add"].([]any)
	want := map[string]bool{"BPF": true, "PERFMON": true, "NET_ADMIN": true, "SYS_ADMIN": true}
	if len(caps) != len(want) {
		t.Errorf("capabilities = %v", caps)
	}
	for _, c := range caps {
		if !want[c.(string)] {
			t.Errorf("unexpected capability %v", c)
		}
	}
	for _, m := range agent["volumeMounts"].([]any) {
		mm := m.(map[string]any)
		if p, ok := mm["mountPropagation"]; ok && p != "HostToContainer" {
			t.Errorf("agent mount %v propagation %v", mm["mountPath"], p)
		}
	}
}

func TestInvalidImage(t *testing.T) {
	if _, err := Objects(RenderOptions{Image: "bad image"}); err == nil {
		t.Fatal("want error for image with a space")
	}
}

func find(t *testing.T, objs []*unstructured.Unstructured, kind string) *unstructured.Unstructured {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == kind {
			return o
		}
	}
	t.Fatalf("no %s", kind)
	return nil
}

// renderDaemonSet renders opts and returns the DaemonSet; with wantErr it
// checks the render fails with it and returns nil.
func renderDaemonSet(t *testing.T, opts RenderOptions, wantErr string) *unstructured.Unstructured {
	t.Helper()
	objs, err := Objects(opts)
	if wantErr != "" {
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Fatalf("err = %v, want %q", err, wantErr)
		}
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return find(t, objs, "DaemonSet")
}

func TestAgentAPIServerEnv(t *testing.T) {
	tests := []struct {
		name       string
		host, port string
		want       map[string]string // nil: neither variable set
		wantErr    string
	}{
		{name: "no cluster: unset"},
		{name: "ipv4", host: "10.0.0.5", port: "6443", want: map[string]string{"KUBERNETES_SERVICE_HOST": "10.0.0.5", "KUBERNETES_SERVICE_PORT": "6443"}},
		// client-go joins host and port itself, so IPv6 goes in bare.
		{name: "ipv6", host: "fd00::1", port: "443", want: map[string]string{"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}},
		{name: "host without port", host: "10.0.0.5", wantErr: "set both or neither"},
		{name: "bad port", host: "10.0.0.5", port: "https", wantErr: `invalid API server port "https"`},
		{name: "port out of range", host: "10.0.0.5", port: "70000", wantErr: `invalid API server port "70000"`},
		{name: "injection", host: "x\"\n- name: EVIL", port: "443", wantErr: "invalid API server host"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ds := renderDaemonSet(t, RenderOptions{APIServerHost: tt.host, APIServerPort: tt.port}, tt.wantErr)
			if ds == nil {
				return
			}
			for _, path := range [][]string{{"spec", "template", "spec", "containers"}, {"spec", "template", "spec", "initContainers"}} {
				cs, _, _ := unstructured.NestedSlice(ds.Object, path...)
				for _, c := range cs {
					c := c.(map[string]any)
					got := map[string]string{}
					env, _ := c["env"].([]any)
					for _, e := range env {
						e := e.(map[string]any)
						if n := e["name"].(string); strings.HasPrefix(n, "KUBERNETES_SERVICE_") {
							got[n], _ = e["value"].(string)
						}
					}
					want := tt.want
					if c["name"] != AgentContainer {
						want = nil // only the agent talks to the API server
					}
					if len(got) != len(want) {
						t.Errorf("container %v env = %v, want %v", c["name"], got, want)
					}
					for k, v := range want {
						if got[k] != v {
							t.Errorf("container %v %s = %q, want %q", c["name"], k, got[k], v)
						}
					}
				}
			}
		})
	}
}

func TestConfigMapRendersConfig(t *testing.T) {
	off := apiv1.AgentConfig{Features: map[string]bool{"sockstats": true, "service-lb": false}}
	tests := []struct {
		name string
		cfg  *apiv1.AgentConfig
		want string
	}{
		{name: "first install: defaults", want: "features:\n  l7: false\n  policy: true\n  service-lb: true\n  sockstats: true\n"},
		{name: "kept from the cluster", cfg: &off, want: "features:\n  service-lb: false\n  sockstats: true\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs, err := Objects(RenderOptions{Config: tt.cfg})
			if err != nil {
				t.Fatal(err)
			}
			cm := find(t, objs, "ConfigMap")
			got, _, _ := unstructured.NestedString(cm.Object, "data", apiv1.ConfigKey)
			if got != tt.want {
				t.Errorf("config.yaml = %q, want %q", got, tt.want)
			}
			if _, err := apiv1.ParseConfig([]byte(got)); err != nil {
				t.Errorf("agent would reject the rendered config: %v", err)
			}
		})
	}
}

var defaultDirs = CNIDirs{Conf: DefaultCNIConfDir, Bin: DefaultCNIBinDir}

func TestAgentCNIChaining(t *testing.T) {
	tests := []struct {
		name          string
		opts          RenderOptions
		wantArgs      string
		wantConf, bin string            // hostPaths; "" = no CNI volumes
		wantStale     map[string]string // stale volume name -> hostPath
		wantRecord    string            // the DaemonSet's AnnotationCNIDirs
		wantErr       string
	}{
		// The literal paths also pin 40-daemonset.yaml to CNIConfMount/CNIBinMount.
		{name: "defaults", wantArgs: "run --cni-conf-dir=/host/cni/net.d --cni-bin-dir=/host/cni/bin", wantConf: DefaultCNIConfDir, bin: DefaultCNIBinDir,
			wantRecord: `[{"conf":"/etc/cni/net.d","bin":"/opt/cni/bin"}]`},
		{name: "custom dirs", opts: RenderOptions{CNIConfDir: "/var/lib/cni/conf", CNIBinDir: "/usr/lib/cni"},
			wantArgs: "run --cni-conf-dir=/host/cni/net.d --cni-bin-dir=/host/cni/bin", wantConf: "/var/lib/cni/conf", bin: "/usr/lib/cni",
			wantRecord: `[{"conf":"/var/lib/cni/conf","bin":"/usr/lib/cni"}]`},
		{name: "opted out", opts: RenderOptions{NoCNIChaining: true}, wantArgs: "run", wantRecord: "[]"},
		{name: "chaining switched off after an install that chained", opts: RenderOptions{NoCNIChaining: true, CNIHistory: []CNIDirs{defaultDirs}},
			wantArgs:   "run --cni-unchain=/host/cni-stale/0/net.d:/host/cni-stale/0/bin",
			wantStale:  map[string]string{"cni-stale-0-conf": DefaultCNIConfDir, "cni-stale-0-bin": DefaultCNIBinDir},
			wantRecord: `[{"conf":"/etc/cni/net.d","bin":"/opt/cni/bin"}]`},
		{name: "conf dir moved: only the old conf dir is stale", opts: RenderOptions{CNIConfDir: "/var/lib/cni/conf", CNIHistory: []CNIDirs{defaultDirs}},
			wantArgs: "run --cni-conf-dir=/host/cni/net.d --cni-bin-dir=/host/cni/bin --cni-unchain=/host/cni-stale/0/net.d:",
			wantConf: "/var/lib/cni/conf", bin: DefaultCNIBinDir, wantStale: map[string]string{"cni-stale-0-conf": DefaultCNIConfDir},
			wantRecord: `[{"conf":"/etc/cni/net.d","bin":"/opt/cni/bin"},{"conf":"/var/lib/cni/conf","bin":"/opt/cni/bin"}]`},
		{name: "same dirs again: nothing stale", opts: RenderOptions{CNIHistory: []CNIDirs{defaultDirs, defaultDirs}},
			wantArgs: "run --cni-conf-dir=/host/cni/net.d --cni-bin-dir=/host/cni/bin", wantConf: DefaultCNIConfDir, bin: DefaultCNIBinDir,
			wantRecord: `[{"conf":"/etc/cni/net.d","bin":"/opt/cni/bin"}]`},
		{name: "bad earlier dir", opts: RenderOptions{CNIHistory: []CNIDirs{{Conf: "etc", Bin: "/opt"}}}, wantErr: "invalid earlier CNI conf dir"},
		{name: "relative dir", opts: RenderOptions{CNIConfDir: "etc/cni"}, wantErr: "invalid CNI conf dir"},
		{name: "unclean dir", opts: RenderOptions{CNIBinDir: "/opt/../cni"}, wantErr: "invalid CNI bin dir"},
		{name: "injection", opts: RenderOptions{CNIConfDir: "/etc\"\n  evil: x"}, wantErr: "invalid CNI conf dir"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ds := renderDaemonSet(t, tt.opts, tt.wantErr)
			if ds == nil {
				return
			}
			cs, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
			var args []string
			for _, a := range cs[0].(map[string]any)["args"].([]any) {
				args = append(args, a.(string))
			}
			if got := strings.Join(args, " "); got != tt.wantArgs {
				t.Errorf("agent args %q, want %q", got, tt.wantArgs)
			}
			vols, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "volumes")
			got := map[string]string{}
			for _, v := range vols {
				v := v.(map[string]any)
				if hp, ok := v["hostPath"].(map[string]any); ok {
					got[v["name"].(string)] = hp["path"].(string)
				}
			}
			if got[CNIConfVolume] != tt.wantConf || got[CNIBinVolume] != tt.bin {
				t.Errorf("CNI hostPaths conf %q bin %q, want %q %q", got[CNIConfVolume], got[CNIBinVolume], tt.wantConf, tt.bin)
			}
			mounts := map[string]string{}
			for _, m := range cs[0].(map[string]any)["volumeMounts"].([]any) {
				m := m.(map[string]any)
				mounts[m["name"].(string)] = m["mountPath"].(string)
			}
			for name, path := range got {
				if !strings.HasPrefix(name, "cni-stale-") {
					continue
				}
				if tt.wantStale[name] != path {
					t.Errorf("stale volume %s = %q, want %q", name, path, tt.wantStale[name])
				}
				if mounts[name] == "" {
					t.Errorf("stale volume %s not mounted in the agent", name)
				}
			}
			for name := range tt.wantStale {
				if _, ok := got[name]; !ok {
					t.Errorf("stale volume %s missing", name)
				}
			}
			if rec := ds.GetAnnotations()[AnnotationCNIDirs]; rec != tt.wantRecord {
				t.Errorf("annotation %s = %s, want %s", AnnotationCNIDirs, rec, tt.wantRecord)
			}
			if tt.wantConf != "" && !strings.Contains(tt.wantArgs, "--cni-conf-dir="+CNIConfMount) {
				t.Errorf("agent args %q do not use CNIConfMount %s", tt.wantArgs, CNIConfMount)
			}
		})
	}
}

// TestAgentHealthPort: the probes reach the port `kubectl ebpf trace`
// port-forwards to (AgentHealthPort), on loopback: the agent serves it
// nowhere else.
func TestAgentHealthPort(t *testing.T) {
	objs, err := Objects(RenderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ds := find(t, objs, "DaemonSet")
	cs, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
	agent := cs[0].(map[string]any)
	for _, probe := range []string{"readinessProbe", "livenessProbe"} {
		port, _, _ := unstructured.NestedFieldNoCopy(agent, probe, "httpGet", "port")
		host, _, _ := unstructured.NestedString(agent, probe, "httpGet", "host")
		if fmt.Sprint(port) != fmt.Sprint(AgentHealthPort) || host != "127.0.0.1" {
			t.Errorf("%s reaches %s:%v, want 127.0.0.1:%d", probe, host, port, AgentHealthPort)
		}
	}
}
