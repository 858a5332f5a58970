// Package manifests holds the Kubernetes objects `kubectl ebpf install`
// applies, embedded so the plugin binary is self-contained.
package manifests

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// Names shared by the plugin commands and the manifests.
const (
	Namespace     = "kubectl-ebpf-system"
	DaemonSetName = "kebpf-agent"
	ConfigMapName = "kubectl-ebpf-config"
	CRDName       = "nodestates.kubectl-ebpf.io"
	FieldManager  = "kubectl-ebpf"

	LabelManagedBy = "app.kubernetes.io/managed-by"
	LabelPartOf    = "app.kubernetes.io/part-of"
	LabelName      = "app.kubernetes.io/name"
	LabelVersion   = "app.kubernetes.io/version"
	LabelValue     = "kubectl-ebpf"

	// AgentContainer is the name of the agent container in the DaemonSet.
	AgentContainer = "agent"

	// AgentHealthPort is the agent's loopback port (127.0.0.1, the agent
	// pod has hostNetwork) for /healthz, /readyz, /metrics, /trace and
	// /explain. `kubectl ebpf trace` reaches it by a port-forward to the
	// agent pod through the API server; 40-daemonset.yaml's probes spell
	// the same number.
	AgentHealthPort = 9890
)

// ManagedSelector selects every object kubectl-ebpf created.
const ManagedSelector = LabelManagedBy + "=" + LabelValue

// AgentSelector selects the agent pods.
const AgentSelector = LabelName + "=" + DaemonSetName

// CommonLabels are put on every object we create.
func CommonLabels() map[string]string {
	return map[string]string{LabelManagedBy: LabelValue, LabelPartOf: LabelValue}
}

//go:embed yaml/*.yaml
var files embed.FS

// RenderOptions parameterise the manifests.
type RenderOptions struct {
	// Image of the agent; DefaultImage() when empty.
	Image string
	// EnvoyImage runs the l7 feature's Envoy DaemonSet; DefaultEnvoyImage
	// when empty. Recorded on the agent DaemonSet (AnnotationEnvoyImage)
	// whether or not l7 is enabled.
	EnvoyImage string
	// Version recorded in the app.kubernetes.io/version label; Version when empty.
	Version string
	// Config is written to the ConfigMap; apiv1.DefaultConfig() when nil. install
	// passes the cluster's current config so a re-install keeps what
	// `kubectl ebpf enable|disable` set.
	Config *apiv1.AgentConfig
	// APIServerHost and APIServerPort, when set, become KUBERNETES_SERVICE_HOST
	// and KUBERNETES_SERVICE_PORT of the agent container: the API server's real
	// endpoint, so the hostNetwork agent reaches it on clusters without
	// kube-proxy, where nothing translates the kubernetes Service's ClusterIP
	// until the agent itself has programmed the socket LB. Both or neither.
	APIServerHost string
	APIServerPort string
	// CNIConfDir and CNIBinDir are the nodes' CNI directories (defaults
	// DefaultCNIConfDir, DefaultCNIBinDir). While the policy feature runs the
	// agent chains kebpf-cni into the conf dir's primary config, so a new
	// pod's policy is programmed before its containers start.
	CNIConfDir, CNIBinDir string
	// NoCNIChaining leaves the nodes' CNI config alone: a new pod is then
	// enforced once the agent sees its IP in the API, not before its first
	// packet.
	NoCNIChaining bool
	// CNIHistory are the CNI dirs earlier installs chained kebpf-cni into
	// (CNIRecordOf the installed DaemonSet); the agent takes it out of every
	// pair that is not the current one (CNIStale).
	CNIHistory []CNIDirs
}

// Default CNI directories, as on kind nodes and most distributions.
const (
	DefaultCNIConfDir = "/etc/cni/net.d"
	DefaultCNIBinDir  = "/opt/cni/bin"
)

// The agent DaemonSet's CNI hostPath volumes and where the agent (and the
// uninstall cleanup pod) mount them; 40-daemonset.yaml spells the same.
const (
	CNIConfVolume = "cni-conf"
	CNIBinVolume  = "cni-bin"
	CNIConfMount  = "/host/cni/net.d"
	CNIBinMount   = "/host/cni/bin"
)

// validHostDir accepts absolute, clean paths the template can quote.
func validHostDir(what, p string) error {
	if !strings.HasPrefix(p, "/") || filepath.Clean(p) != p || p == "/" || strings.ContainsAny(p, " \t\n\"'{}\\") {
		return fmt.Errorf("invalid %s %q: an absolute, clean host path is required", what, p)
	}
	return nil
}

// Objects renders every embedded manifest, in apply order (namespace and CRD
// first, the DaemonSets last), with the common labels on each object and on
// the DaemonSets' pod templates. The Envoy DaemonSet is among them only when
// the config enables l7.
func Objects(opts RenderOptions) ([]*unstructured.Unstructured, error) {
	if err := opts.complete(); err != nil {
		return nil, err
	}
	cniRecord, err := opts.CNIRecordJSON()
	if err != nil {
		return nil, err
	}
	cfg := apiv1.DefaultConfig()
	if opts.Config != nil {
		cfg = *opts.Config
	}
	cfgYAML, err := cfg.Marshal()
	if err != nil {
		return nil, err
	}
	names, err := fs.Glob(files, "yaml/*.yaml")
	if err != nil {
		return nil, err
	}
	sort.Strings(names) // file names carry the apply order
	var objs []*unstructured.Unstructured
	for _, name := range names {
		if name == envoyFile && !cfg.Enabled(apiv1.FeatureL7) {
			continue
		}
		docs, err := render(name, opts)
		if err != nil {
			return nil, err
		}
		objs = append(objs, docs...)
	}
	for _, o := range objs {
		// Set here, not in the template: a YAML block scalar inside a
		// template is one indentation slip away from a different document.
		if o.GetKind() == "DaemonSet" && o.GetName() == DaemonSetName {
			a := o.GetAnnotations()
			if a == nil {
				a = map[string]string{}
			}
			a[AnnotationCNIDirs] = cniRecord
			a[AnnotationEnvoyImage] = opts.EnvoyImage
			o.SetAnnotations(a)
		}
		if o.GetKind() == "ConfigMap" && o.GetName() == ConfigMapName {
			if err := unstructured.SetNestedField(o.Object, string(cfgYAML), "data", apiv1.ConfigKey); err != nil {
				return nil, fmt.Errorf("set %s: %w", apiv1.ConfigKey, err)
			}
		}
	}
	return objs, nil
}

// EnvoyDaemonSet renders the l7 feature's Envoy DaemonSet alone, as Objects
// does when the config enables l7 (opts.Config is not consulted): what
// `kubectl ebpf enable l7` applies.
func EnvoyDaemonSet(opts RenderOptions) (*unstructured.Unstructured, error) {
	if err := opts.complete(); err != nil {
		return nil, err
	}
	docs, err := render(envoyFile, opts)
	if err != nil {
		return nil, err
	}
	if len(docs) != 1 || docs[0].GetKind() != "DaemonSet" || docs[0].GetName() != EnvoyDaemonSetName {
		return nil, fmt.Errorf("%s: want exactly the DaemonSet %s", envoyFile, EnvoyDaemonSetName)
	}
	return docs[0], nil
}

// complete fills in the defaults of opts and validates it.
func (opts *RenderOptions) complete() error {
	if opts.Image == "" {
		opts.Image = DefaultImage()
	}
	if opts.EnvoyImage == "" {
		opts.EnvoyImage = DefaultEnvoyImage
	}
	if opts.Version == "" {
		opts.Version = Version
	}
	if err := ValidImage("image", opts.Image); err != nil {
		return err
	}
	if err := ValidImage("Envoy image", opts.EnvoyImage); err != nil {
		return err
	}
	if (opts.APIServerHost == "") != (opts.APIServerPort == "") {
		return fmt.Errorf("API server host %q and port %q: set both or neither", opts.APIServerHost, opts.APIServerPort)
	}
	if opts.APIServerHost != "" {
		if strings.ContainsAny(opts.APIServerHost, " \t\n\"'{}[]/") {
			return fmt.Errorf("invalid API server host %q", opts.APIServerHost)
		}
		if p, err := strconv.Atoi(opts.APIServerPort); err != nil || p < 1 || p > 65535 {
			return fmt.Errorf("invalid API server port %q", opts.APIServerPort)
		}
	}
	if opts.CNIConfDir == "" {
		opts.CNIConfDir = DefaultCNIConfDir
	}
	if opts.CNIBinDir == "" {
		opts.CNIBinDir = DefaultCNIBinDir
	}
	if err := validHostDir("CNI conf dir", opts.CNIConfDir); err != nil {
		return err
	}
	if err := validHostDir("CNI bin dir", opts.CNIBinDir); err != nil {
		return err
	}
	for _, d := range opts.CNIHistory {
		if err := validHostDir("earlier CNI conf dir", d.Conf); err != nil {
			return err
		}
		if err := validHostDir("earlier CNI bin dir", d.Bin); err != nil {
			return err
		}
	}
	return nil
}

// render executes one embedded manifest with opts and labels its objects.
func render(name string, opts RenderOptions) ([]*unstructured.Unstructured, error) {
	raw, err := files.ReadFile(name)
	if err != nil {
		return nil, err
	}
	tmpl, err := template.New(name).Option("missingkey=error").Parse(string(raw))
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", name, err)
	}
	var buf bytes.Buffer
	if err := tmpl.Execute(&buf, opts); err != nil {
		return nil, fmt.Errorf("render %s: %w", name, err)
	}
	docs, err := decode(buf.Bytes())
	if err != nil {
		return nil, fmt.Errorf("decode %s: %w", name, err)
	}
	for _, o := range docs {
		addLabels(o)
	}
	return docs, nil
}

func decode(data []byte) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var out []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return nil, err
		}
		if len(m) == 0 {
			continue
		}
		u := &unstructured.Unstructured{Object: m}
		if u.GetKind() == "" || u.GetAPIVersion() == "" || u.GetName() == "" {
			return nil, fmt.Errorf("object without kind, apiVersion or name: %v", m)
		}
		out = append(out, u)
	}
}

func addLabels(o *unstructured.Unstructured) {
	l := o.GetLabels()
	if l == nil {
		l = map[string]string{}
	}
	for k, v := range CommonLabels() {
		l[k] = v
	}
	o.SetLabels(l)
	if o.GetKind() == "DaemonSet" || o.GetKind() == "Deployment" {
		tl, _, _ := unstructured.NestedStringMap(o.Object, "spec", "template", "metadata", "labels")
		if tl == nil {
			tl = map[string]string{}
		}
		for k, v := range CommonLabels() {
			tl[k] = v
		}
		_ = unstructured.SetNestedStringMap(o.Object, tl, "spec", "template", "metadata", "labels")
	}
}
