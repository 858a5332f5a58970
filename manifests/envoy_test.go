package manifests

import (
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

func l7Config(on bool) *apiv1.AgentConfig {
	cfg := apiv1.DefaultConfig()
	cfg.Features[apiv1.FeatureL7] = on
	return &cfg
}

func daemonSets(objs []*unstructured.Unstructured) map[string]*unstructured.Unstructured {
	out := map[string]*unstructured.Unstructured{}
	for _, o := range objs {
		if o.GetKind() == "DaemonSet" {
			out[o.GetName()] = o
		}
	}
	return out
}

func TestEnvoyDaemonSetOnlyWithL7(t *testing.T) {
	for _, on := range []bool{false, true} {
		objs, err := Objects(RenderOptions{Config: l7Config(on), EnvoyImage: "example.test/envoy:v9"})
		if err != nil {
			t.Fatal(err)
		}
		ds := daemonSets(objs)
		if _, got := ds[EnvoyDaemonSetName]; got != on {
			t.Errorf("l7 %v: Envoy DaemonSet rendered: %v", on, got)
		}
		if objs[len(objs)-1].GetKind() != "DaemonSet" {
			t.Errorf("l7 %v: last object is %s, want a DaemonSet", on, objs[len(objs)-1].GetKind())
		}
		// Recorded whether or not l7 is on, for a later `enable l7`.
		if got := ds[DaemonSetName].GetAnnotations()[AnnotationEnvoyImage]; got != "example.test/envoy:v9" {
			t.Errorf("l7 %v: agent annotation %s = %q", on, AnnotationEnvoyImage, got)
		}
	}
	objs, err := Objects(RenderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := daemonSets(objs)[DaemonSetName].GetAnnotations()[AnnotationEnvoyImage]; got != DefaultEnvoyImage {
		t.Errorf("default Envoy image recorded as %q, want %q", got, DefaultEnvoyImage)
	}
}

// EnvoyDaemonSet is what Objects renders with l7 on.
func TestEnvoyDaemonSetAlone(t *testing.T) {
	opts := RenderOptions{Image: "example.test/agent:v9", Version: "v9", EnvoyImage: "example.test/envoy:v1"}
	alone, err := EnvoyDaemonSet(opts)
	if err != nil {
		t.Fatal(err)
	}
	opts.Config = l7Config(true)
	objs, err := Objects(opts)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(alone.Object, daemonSets(objs)[EnvoyDaemonSetName].Object) {
		t.Error("EnvoyDaemonSet differs from the one Objects renders")
	}
	if _, err := EnvoyDaemonSet(RenderOptions{EnvoyImage: "Bad Image"}); err == nil || !strings.Contains(err.Error(), `invalid Envoy image "Bad Image"`) {
		t.Errorf("err = %v", err)
	}
}

func container(t *testing.T, ds *unstructured.Unstructured, list, name string) map[string]any {
	t.Helper()
	cs, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", list)
	for _, c := range cs {
		if c := c.(map[string]any); c["name"] == name {
			return c
		}
	}
	t.Fatalf("no %s %s", list, name)
	return nil
}

func strs(v any) []string {
	var out []string
	for _, s := range v.([]any) {
		out = append(out, s.(string))
	}
	return out
}

// The pod spec the agent side relies on (labels, socket dir, node id) and
// the guarantees the comments in 50-envoy.yaml make.
func TestEnvoyDaemonSetSpec(t *testing.T) {
	ds, err := EnvoyDaemonSet(RenderOptions{Image: "example.test/agent:v9", EnvoyImage: "example.test/envoy:v1"})
	if err != nil {
		t.Fatal(err)
	}
	if ds.GetNamespace() != Namespace {
		t.Errorf("namespace %q", ds.GetNamespace())
	}
	tl, _, _ := unstructured.NestedStringMap(ds.Object, "spec", "template", "metadata", "labels")
	sel, _, _ := unstructured.NestedStringMap(ds.Object, "spec", "selector", "matchLabels")
	if k, v, _ := strings.Cut(EnvoySelector, "="); tl[k] != v || sel[k] != v {
		t.Errorf("pod labels %v, selector %v: want %s", tl, sel, EnvoySelector)
	}
	for k, v := range CommonLabels() {
		if tl[k] != v {
			t.Errorf("pod template label %s = %q", k, tl[k])
		}
	}
	spec, _, _ := unstructured.NestedMap(ds.Object, "spec", "template", "spec")
	if spec["hostNetwork"] != true || spec["dnsPolicy"] != "ClusterFirstWithHostNet" || spec["automountServiceAccountToken"] != false {
		t.Errorf("pod basics: hostNetwork %v dnsPolicy %v automount %v", spec["hostNetwork"], spec["dnsPolicy"], spec["automountServiceAccountToken"])
	}
	psc := spec["securityContext"].(map[string]any)
	if psc["runAsNonRoot"] != true || fmt.Sprint(psc["runAsUser"]) != fmt.Sprint(EnvoyUID) || fmt.Sprint(psc["runAsGroup"]) != fmt.Sprint(EnvoyGID) {
		t.Errorf("pod securityContext %v, want uid %d gid %d non-root", psc, EnvoyUID, EnvoyGID)
	}

	initC := container(t, ds, "initContainers", "bootstrap")
	envoy := container(t, ds, "containers", EnvoyContainer)
	if initC["image"] != "example.test/agent:v9" || envoy["image"] != "example.test/envoy:v1" {
		t.Errorf("images: bootstrap %v envoy %v", initC["image"], envoy["image"])
	}
	for _, c := range []map[string]any{initC, envoy} {
		sc := c["securityContext"].(map[string]any)
		caps := sc["capabilities"].(map[string]any)
		if _, ok := caps["add"]; ok || !slices.Equal(strs(caps["drop"]), []string{"ALL"}) || sc["allowPrivilegeEscalation"] != false || sc["privileged"] != nil {
			t.Errorf("%s securityContext %v: want every capability dropped, no escalation", c["name"], sc)
		}
	}
	args := map[string]string{}
	for _, a := range strs(initC["args"])[1:] {
		k, v, _ := strings.Cut(a, "=")
		args[k] = v
	}
	if strs(initC["args"])[0] != "envoy-bootstrap" || args["--node"] != "$(NODE_NAME)" || args["--xds-socket"] != EnvoyXDSSocket {
		t.Errorf("bootstrap args %v", initC["args"])
	}
	// The probe and the drain run the binary the init container copies,
	// against the admin socket it wrote into the bootstrap.
	probe := strs(envoy["readinessProbe"].(map[string]any)["exec"].(map[string]any)["command"])
	drain := strs(envoy["lifecycle"].(map[string]any)["preStop"].(map[string]any)["exec"].(map[string]any)["command"])
	for _, cmd := range [][]string{probe, drain} {
		if cmd[0] != args["--copy-self"] || !slices.Contains(cmd, "--admin-socket="+args["--admin-socket"]) {
			t.Errorf("command %v does not run %s against %s", cmd, args["--copy-self"], args["--admin-socket"])
		}
	}
	if probe[1] != "envoy-probe" || drain[1] != "envoy-drain" {
		t.Errorf("probe %v, preStop %v", probe, drain)
	}
	if ea := strings.Join(strs(envoy["args"]), " "); !strings.HasPrefix(ea, "--config-path "+args["--out"]+" ") || strings.Contains(ea, "=") {
		// Envoy's TCLAP parser rejects --flag=value.
		t.Errorf("envoy args %v: want --config-path %s first and no --flag=value", envoy["args"], args["--out"])
	}

	// The xDS socket's directory is mounted from the host at its host path.
	vols, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "volumes")
	hostPaths := map[string]string{}
	for _, v := range vols {
		v := v.(map[string]any)
		if hp, ok := v["hostPath"].(map[string]any); ok {
			hostPaths[v["name"].(string)] = hp["path"].(string)
		}
	}
	if len(hostPaths) != 1 || hostPaths["xds"] != EnvoySocketDir {
		t.Errorf("hostPaths %v, want only xds=%s", hostPaths, EnvoySocketDir)
	}
	mounted := false
	for _, m := range envoy["volumeMounts"].([]any) {
		m := m.(map[string]any)
		if m["name"] == "xds" && m["mountPath"] == EnvoySocketDir {
			mounted = true
		}
	}
	if !mounted || !strings.HasPrefix(EnvoyXDSSocket, EnvoySocketDir+"/") {
		t.Errorf("xds volume not mounted at %s (socket %s)", EnvoySocketDir, EnvoyXDSSocket)
	}
}

func TestValidImage(t *testing.T) {
	for _, tt := range []struct {
		image string
		ok    bool
	}{
		{DefaultEnvoyImage, true},
		{"envoyproxy/envoy:v1.40.0", true},
		{"envoy", true},
		{"localhost/kubectl-ebpf/envoy:1.40.0", true},
		{"registry.example.test:5000/team/envoy-distroless:v1.40.0-1", true},
		{"envoyproxy/envoy@sha256:" + strings.Repeat("ab", 32), true},
		{"envoyproxy/envoy:v1.40.0@sha256:" + strings.Repeat("ab", 32), true},
		{"", false},
		{"envoyproxy/Envoy:v1", false},
		{"envoyproxy/envoy:", false},
		{"envoyproxy/envoy:v1 --evil", false},
		{"envoy\"\n  evil: x", false},
		{"envoyproxy//envoy", false},
		{"envoyproxy/envoy:" + strings.Repeat("x", 129), false},
	} {
		err := ValidImage("Envoy image", tt.image)
		if (err == nil) != tt.ok {
			t.Errorf("ValidImage(%q) = %v, want ok %v", tt.image, err, tt.ok)
		}
	}
}
