package install_test

import (
	"bytes"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	"k8s.io/utils/ptr"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/install"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

func endpointSlice(name string, addrType discoveryv1.AddressType, addr string, port int32) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "kubernetes"}},
		AddressType: addrType,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{addr}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}}},
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("https"), Port: ptr.To(port), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
}

func existingConfig(config string) *corev1.ConfigMap {
	return &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: manifests.ConfigMapName, Namespace: manifests.Namespace},
		Data:       map[string]string{apiv1.ConfigKey: config},
	}
}

func agentEnv(t *testing.T, ds *unstructured.Unstructured) map[string]string {
	t.Helper()
	env := map[string]string{}
	cs, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
	for _, c := range cs {
		c := c.(map[string]any)
		if c["name"] != manifests.AgentContainer {
			continue
		}
		list, _ := c["env"].([]any)
		for _, e := range list {
			e := e.(map[string]any)
			if n := e["name"].(string); strings.HasPrefix(n, "KUBERNETES_SERVICE_") {
				env[n], _ = e["value"].(string)
			}
		}
	}
	return env
}

func TestInstallKeepsFeaturesAndSetsAPIServer(t *testing.T) {
	const defaults = "features:\n  l7: false\n  policy: true\n  service-lb: true\n  sockstats: true\n"
	tests := []struct {
		name       string
		objs       []runtime.Object
		enable     []string
		disable    []string
		wantConfig string
		wantEnv    map[string]string
		wantWarn   []string
	}{
		{name: "first install: defaults", objs: []runtime.Object{endpointSlice("kubernetes", discoveryv1.AddressTypeIPv4, "10.1.2.3", 6443)},
			wantConfig: defaults, wantEnv: map[string]string{"KUBERNETES_SERVICE_HOST": "10.1.2.3", "KUBERNETES_SERVICE_PORT": "6443"}},
		{name: "first install with --disable", objs: []runtime.Object{endpointSlice("kubernetes", discoveryv1.AddressTypeIPv4, "10.1.2.3", 6443)},
			disable: []string{"service-lb"}, wantConfig: "features:\n  l7: false\n  policy: true\n  service-lb: false\n  sockstats: true\n",
			wantEnv: map[string]string{"KUBERNETES_SERVICE_HOST": "10.1.2.3", "KUBERNETES_SERVICE_PORT": "6443"}},
		{name: "re-install keeps a disabled feature, drops unknown ones",
			objs: []runtime.Object{
				existingConfig("features:\n  bogus: true\n  service-lb: false\n  sockstats: true\n"),
				endpointSlice("kubernetes", discoveryv1.AddressTypeIPv4, "10.1.2.3", 6443),
			},
			wantConfig: "features:\n  service-lb: false\n  sockstats: true\n",
			wantEnv:    map[string]string{"KUBERNETES_SERVICE_HOST": "10.1.2.3", "KUBERNETES_SERVICE_PORT": "6443"},
			wantWarn:   []string{"warning: dropping unknown feature(s) bogus from the config (known: sockstats, service-lb, policy, l7)"}},
		{name: "flags override the cluster's config",
			objs:       []runtime.Object{existingConfig("features:\n  service-lb: false\n  sockstats: true\n")},
			enable:     []string{"service-lb"},
			disable:    []string{"sockstats"},
			wantConfig: "features:\n  service-lb: true\n  sockstats: false\n",
			wantWarn:   []string{"warning: API server endpoint unknown"}},
		{name: "unparsable config is replaced by the defaults",
			objs:       []runtime.Object{existingConfig("features: ["), endpointSlice("kubernetes", discoveryv1.AddressTypeIPv4, "10.1.2.3", 6443)},
			wantConfig: defaults,
			wantEnv:    map[string]string{"KUBERNETES_SERVICE_HOST": "10.1.2.3", "KUBERNETES_SERVICE_PORT": "6443"},
			wantWarn:   []string{"warning: parse config.yaml in ConfigMap kubectl-ebpf-system/kubectl-ebpf-config:", "writing the default features"}},
		{name: "dual stack: IPv4 first", objs: []runtime.Object{
			endpointSlice("kubernetes-v6", discoveryv1.AddressTypeIPv6, "fd00::1", 6443),
			endpointSlice("kubernetes", discoveryv1.AddressTypeIPv4, "10.1.2.3", 6443),
		}, wantConfig: defaults, wantEnv: map[string]string{"KUBERNETES_SERVICE_HOST": "10.1.2.3", "KUBERNETES_SERVICE_PORT": "6443"}},
		{name: "IPv6 only", objs: []runtime.Object{endpointSlice("kubernetes", discoveryv1.AddressTypeIPv6, "fd00::1", 443)},
			wantConfig: defaults, wantEnv: map[string]string{"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}},
		{name: "Endpoints fallback", objs: []runtime.Object{&corev1.Endpoints{ //nolint:staticcheck // the fallback under test
			ObjectMeta: metav1.ObjectMeta{Name: "kubernetes", Namespace: "default"},
			Subsets: []corev1.EndpointSubset{{ //nolint:staticcheck
				Addresses: []corev1.EndpointAddress{{IP: "192.168.7.7"}},      //nolint:staticcheck
				Ports:     []corev1.EndpointPort{{Name: "https", Port: 8443}}, //nolint:staticcheck
			}},
		}}, wantConfig: defaults, wantEnv: map[string]string{"KUBERNETES_SERVICE_HOST": "192.168.7.7", "KUBERNETES_SERVICE_PORT": "8443"}},
		{name: "no endpoint: no env, a warning", wantConfig: defaults,
			wantWarn: []string{"warning: API server endpoint unknown (get Endpoints default/kubernetes: endpoints \"kubernetes\" not found): the agent will use the kubernetes Service, which needs kube-proxy"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := testutil.NewFake(t, tt.objs)
			got := f.RecordApplies()
			var out, errOut bytes.Buffer
			o := &install.Options{IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &errOut}, DryRun: "none", Timeout: time.Minute,
				Conn: kube.Conn{Clients: f.Clients}, Enable: tt.enable, Disable: tt.disable}
			if err := testutil.RunOptions(t, o); err != nil {
				t.Fatalf("%v\n%s%s", err, out.String(), errOut.String())
			}
			cm, ds := got["ConfigMap/"+manifests.ConfigMapName], got["DaemonSet/"+manifests.DaemonSetName]
			if cm == nil || ds == nil {
				t.Fatalf("ConfigMap or DaemonSet not applied: %v", got)
			}
			if c, _, _ := unstructured.NestedString(cm.Object, "data", apiv1.ConfigKey); c != tt.wantConfig {
				t.Errorf("config.yaml = %q, want %q", c, tt.wantConfig)
			}
			env := agentEnv(t, ds)
			if len(env) != len(tt.wantEnv) {
				t.Errorf("agent env = %v, want %v", env, tt.wantEnv)
			}
			for k, v := range tt.wantEnv {
				if env[k] != v {
					t.Errorf("%s = %q, want %q", k, env[k], v)
				}
			}
			for _, w := range tt.wantWarn {
				if !strings.Contains(errOut.String(), w) {
					t.Errorf("stderr %q lacks %q", errOut.String(), w)
				}
			}
			if len(tt.wantWarn) == 0 && errOut.Len() > 0 {
				t.Errorf("unexpected stderr %q", errOut.String())
			}
		})
	}
}

func TestInstallFeatureFlagsValidate(t *testing.T) {
	tests := []struct {
		name            string
		enable, disable []string
		wantErr         string
	}{
		{name: "known", enable: []string{"sockstats"}, disable: []string{"service-lb"}},
		{name: "unknown", disable: []string{"bogus"}, wantErr: `unknown feature "bogus": known features are sockstats, service-lb, policy, l7`},
		{name: "both", enable: []string{"service-lb"}, disable: []string{"service-lb"}, wantErr: `feature "service-lb" both enabled and disabled`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := install.Options{DryRun: "none", Timeout: time.Minute, Enable: tt.enable, Disable: tt.disable}
			err := o.Validate()
			if tt.wantErr == "" && err != nil {
				t.Fatal(err)
			}
			if tt.wantErr != "" && (err == nil || err.Error() != tt.wantErr) {
				t.Errorf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

// Without a cluster -o yaml cannot know the endpoint or the cluster's
// features; it must say so rather than print a silently different manifest.
func TestInstallOfflineYAMLSaysWhatIsMissing(t *testing.T) {
	r := testutil.Run(t, testutil.Flags(t, "/nonexistent/kubeconfig"), "install", "-o", "yaml", "--disable", "service-lb")
	if r.Code != 0 {
		t.Fatal(r)
	}
	if !strings.HasPrefix(r.Stdout, "# Rendered without a cluster") || !strings.Contains(r.Stdout, "KUBERNETES_SERVICE_HOST/PORT") {
		t.Errorf("no note at the top of the YAML: %.300s", r.Stdout)
	}
	if strings.Contains(r.Stdout, "name: KUBERNETES_SERVICE_HOST") {
		t.Error("offline YAML sets KUBERNETES_SERVICE_HOST")
	}
	if !strings.Contains(r.Stdout, "service-lb: false") {
		t.Error("--disable not rendered into the ConfigMap")
	}

	r = testutil.Run(t, testutil.Flags(t, "/nonexistent/kubeconfig"), "install", "--dry-run=client")
	if r.Code != 0 || !strings.Contains(r.Stderr, "KUBERNETES_SERVICE_HOST/PORT not set") {
		t.Errorf("dry-run=client does not note the missing endpoint: %s", r)
	}
}

// installedAgent is the agent DaemonSet an earlier install left: the CNI
// dirs it mounts and its record of where kebpf-cni was chained.
func installedAgent(mounts *manifests.CNIDirs, record string) *appsv1.DaemonSet {
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: manifests.DaemonSetName, Namespace: manifests.Namespace}}
	if record != "" {
		ds.Annotations = map[string]string{manifests.AnnotationCNIDirs: record}
	}
	if mounts != nil {
		ds.Spec.Template.Spec.Volumes = []corev1.Volume{
			{Name: manifests.CNIConfVolume, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: mounts.Conf}}},
			{Name: manifests.CNIBinVolume, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: mounts.Bin}}},
		}
	}
	return ds
}

// An install that chains elsewhere or not at all has the new agent take
// kebpf-cni out of wherever an earlier install chained it, and the record
// keeps every such place for uninstall.
func TestInstallRemembersCNIDirs(t *testing.T) {
	def := &manifests.CNIDirs{Conf: manifests.DefaultCNIConfDir, Bin: manifests.DefaultCNIBinDir}
	const defRecord = `[{"conf":"/etc/cni/net.d","bin":"/opt/cni/bin"}]`
	tests := []struct {
		name        string
		existing    *appsv1.DaemonSet
		flags       func(*install.Options)
		wantUnchain []string
		wantRecord  string
		wantWarn    string
	}{
		{name: "first install", wantRecord: defRecord},
		{name: "--no-cni-chaining over a release that chained (no record yet)", existing: installedAgent(def, ""),
			flags:       func(o *install.Options) { o.NoCNIChaining = true },
			wantUnchain: []string{"--cni-unchain=/host/cni-stale/0/net.d:/host/cni-stale/0/bin"}, wantRecord: defRecord},
		{name: "--no-cni-chaining again keeps the record", existing: installedAgent(nil, defRecord),
			flags:       func(o *install.Options) { o.NoCNIChaining = true },
			wantUnchain: []string{"--cni-unchain=/host/cni-stale/0/net.d:/host/cni-stale/0/bin"}, wantRecord: defRecord},
		{name: "chaining back on where it was", existing: installedAgent(nil, defRecord), wantRecord: defRecord},
		{name: "both dirs moved", existing: installedAgent(def, defRecord),
			flags:       func(o *install.Options) { o.CNIConfDir, o.CNIBinDir = "/var/lib/cni/net.d", "/usr/lib/cni" },
			wantUnchain: []string{"--cni-unchain=/host/cni-stale/0/net.d:/host/cni-stale/0/bin"},
			wantRecord:  `[{"conf":"/etc/cni/net.d","bin":"/opt/cni/bin"},{"conf":"/var/lib/cni/net.d","bin":"/usr/lib/cni"}]`},
		{name: "a hand-edited record is warned about, the mounts still count", existing: installedAgent(def, `[{"conf":"etc","bin":"/x"}]`),
			flags:       func(o *install.Options) { o.NoCNIChaining = true },
			wantUnchain: []string{"--cni-unchain=/host/cni-stale/0/net.d:/host/cni-stale/0/bin"}, wantRecord: defRecord,
			wantWarn: "invalid CNI conf dir in annotation kubectl-ebpf.io/cni-dirs"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs := []runtime.Object{endpointSlice("kubernetes", discoveryv1.AddressTypeIPv4, "10.1.2.3", 6443)}
			if tt.existing != nil {
				objs = append(objs, tt.existing)
			}
			f := testutil.NewFake(t, objs)
			got := f.RecordApplies()
			var out, errOut bytes.Buffer
			o := &install.Options{IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &errOut}, DryRun: "none", Timeout: time.Minute,
				Conn: kube.Conn{Clients: f.Clients}, CNIConfDir: manifests.DefaultCNIConfDir, CNIBinDir: manifests.DefaultCNIBinDir}
			if tt.flags != nil {
				tt.flags(o)
			}
			if err := testutil.RunOptions(t, o); err != nil {
				t.Fatalf("%v\n%s%s", err, out.String(), errOut.String())
			}
			ds := got["DaemonSet/"+manifests.DaemonSetName]
			if ds == nil {
				t.Fatal("DaemonSet not applied")
			}
			if rec := ds.GetAnnotations()[manifests.AnnotationCNIDirs]; rec != tt.wantRecord {
				t.Errorf("record %s, want %s", rec, tt.wantRecord)
			}
			cs, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
			var unchain []string
			for _, a := range cs[0].(map[string]any)["args"].([]any) {
				if strings.HasPrefix(a.(string), "--cni-unchain") {
					unchain = append(unchain, a.(string))
				}
			}
			if strings.Join(unchain, " ") != strings.Join(tt.wantUnchain, " ") {
				t.Errorf("agent unchain args %q, want %q", unchain, tt.wantUnchain)
			}
			if tt.wantWarn != "" && !strings.Contains(errOut.String(), tt.wantWarn) {
				t.Errorf("stderr %q lacks %q", errOut.String(), tt.wantWarn)
			}
		})
	}
}
