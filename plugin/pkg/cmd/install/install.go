// Package install implements `kubectl ebpf install`.
package install

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/health"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
)

// Dry-run modes, as in kubectl.
const (
	DryRunNone   = "none"
	DryRunClient = "client"
	DryRunServer = "server"
)

// Options are the inputs of one install.
type Options struct {
	kube.Conn
	genericiooptions.IOStreams

	Image string
	// EnvoyImage runs the l7 feature's Envoy DaemonSet; recorded on the
	// agent DaemonSet whether or not l7 is on, for a later `enable l7`.
	EnvoyImage string
	Wait       bool
	Timeout    time.Duration
	DryRun     string
	Output     string
	// Enable and Disable override features on top of the cluster's current
	// config (or DefaultConfig on a first install).
	Enable  []string
	Disable []string
	// CNI directories on the nodes, and whether to chain kebpf-cni at all.
	CNIConfDir, CNIBinDir string
	NoCNIChaining         bool
	// SkipImageCheck rolls out without first running the images on
	// every node (see checkImages).
	SkipImageCheck bool

	// PollInterval is how often --wait re-reads the cluster.
	PollInterval time.Duration

	objects []*unstructured.Unstructured
}

// NewCmd returns the install command.
func NewCmd(flags *genericclioptions.ConfigFlags, streams genericiooptions.IOStreams) *cobra.Command {
	o := &Options{Conn: kube.Conn{Flags: flags}, IOStreams: streams, PollInterval: 2 * time.Second}
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Install or upgrade the node agents",
		Long: "Checks permissions and node kernels, then server-side applies the namespace, CRD, RBAC, " +
			"config and the agent DaemonSet, and the Envoy DaemonSet when the l7 feature is enabled (deleting it when not). " +
			"Running it again is a no-op, or an upgrade when --image or --envoy-image differs.",
		Example: "  kubectl ebpf install --wait\n  kubectl ebpf install -o yaml > kubectl-ebpf.yaml",
		Args:    cobra.NoArgs,
		RunE:    cmdutil.RunE(o),
	}
	cmd.Flags().StringVar(&o.Image, "image", manifests.DefaultImage(), "agent image")
	cmd.Flags().StringVar(&o.EnvoyImage, "envoy-image", manifests.DefaultEnvoyImage, "Envoy image of the l7 feature (stock Envoy "+
		"configured over xDS; recorded for `kubectl ebpf enable l7` while l7 is off)")
	cmd.Flags().BoolVar(&o.Wait, "wait", false, "wait until the agent is ready on every node")
	cmd.Flags().BoolVar(&o.SkipImageCheck, "skip-image-check", false, "roll out without first running a new agent (or Envoy) image on every node; "+
		"the check keeps a typo'd --image from leaving nodes without a working agent, which refuse new pods")
	cmd.Flags().DurationVar(&o.Timeout, "timeout", 5*time.Minute, "how long --wait waits")
	cmd.Flags().StringVar(&o.DryRun, "dry-run", DryRunNone, `"none", "client" (print what would be applied) or "server" (validate with the API server, persist nothing)`)
	cmd.Flags().Lookup("dry-run").NoOptDefVal = DryRunClient
	cmd.Flags().StringVarP(&o.Output, "output", "o", "", `"yaml" prints the manifests instead of applying them`)
	cmd.Flags().StringVar(&o.CNIConfDir, "cni-conf-dir", manifests.DefaultCNIConfDir, "the nodes' CNI config dir: while the policy feature runs, kebpf-cni is chained into its first config so a new pod's policy is programmed before its containers start")
	cmd.Flags().StringVar(&o.CNIBinDir, "cni-bin-dir", manifests.DefaultCNIBinDir, "the nodes' CNI plugin dir (kebpf-cni is installed there)")
	cmd.Flags().BoolVar(&o.NoCNIChaining, "no-cni-chaining", false, "leave the nodes' CNI config alone; a new pod is then enforced once its IP is in the API, which can be after its first packets")
	known := strings.Join(apiv1.KnownFeatures, ", ")
	cmd.Flags().StringArrayVar(&o.Enable, "enable", nil, "enable this feature (repeatable; "+known+"); features not named keep their current state, all on for a first install")
	cmd.Flags().StringArrayVar(&o.Disable, "disable", nil, "disable this feature (repeatable; "+known+")")
	complete := func(*cobra.Command, []string, string) ([]cobra.Completion, cobra.ShellCompDirective) {
		return slices.Clone(apiv1.KnownFeatures), cobra.ShellCompDirectiveNoFileComp
	}
	_ = cmd.RegisterFlagCompletionFunc("enable", complete)
	_ = cmd.RegisterFlagCompletionFunc("disable", complete)
	return cmd
}

// Complete fills in defaults and renders the manifests.
func (o *Options) Complete(_ []string) error {
	if o.DryRun == "" {
		o.DryRun = DryRunNone
	}
	if o.Image == "" {
		o.Image = manifests.DefaultImage()
	}
	if o.EnvoyImage == "" {
		o.EnvoyImage = manifests.DefaultEnvoyImage
	}
	// Rendered without the cluster here, so a bad --image fails before any
	// API call; Run renders again with the cluster's config and API endpoint.
	cfg := o.withFlags(apiv1.DefaultConfig())
	return o.render(manifests.RenderOptions{Config: &cfg})
}

func (o *Options) render(ro manifests.RenderOptions) error {
	ro.Image, ro.Version, ro.EnvoyImage = o.Image, imageVersion(o.Image), o.EnvoyImage
	ro.CNIConfDir, ro.CNIBinDir, ro.NoCNIChaining = o.CNIConfDir, o.CNIBinDir, o.NoCNIChaining
	objs, err := manifests.Objects(ro)
	if err != nil {
		return err
	}
	o.objects = objs
	return nil
}

// withFlags applies --enable and --disable to a copy of cfg.
func (o *Options) withFlags(cfg apiv1.AgentConfig) apiv1.AgentConfig {
	out := apiv1.AgentConfig{Features: maps.Clone(cfg.Features)}
	if out.Features == nil {
		out.Features = map[string]bool{}
	}
	for _, f := range o.Enable {
		out.Features[f] = true
	}
	for _, f := range o.Disable {
		out.Features[f] = false
	}
	return out
}

func (o *Options) needsCluster() bool {
	return o.DryRun == DryRunServer || (o.DryRun == DryRunNone && o.Output == "")
}

// Validate checks the flags.
func (o *Options) Validate() error {
	switch o.DryRun {
	case DryRunNone, DryRunClient, DryRunServer:
	default:
		return fmt.Errorf("invalid --dry-run %q: want none, client or server", o.DryRun)
	}
	if err := cmdutil.ValidateOutput(o.Output, "yaml"); err != nil {
		return err
	}
	if err := cmdutil.ValidateTimeout(o.Timeout); err != nil {
		return err
	}
	if o.Wait && (o.DryRun != DryRunNone || o.Output != "") {
		return fmt.Errorf("--wait cannot be combined with --dry-run or -o")
	}
	for _, f := range append(slices.Clone(o.Enable), o.Disable...) {
		if !slices.Contains(apiv1.KnownFeatures, f) {
			return fmt.Errorf("unknown feature %q: known features are %s", f, strings.Join(apiv1.KnownFeatures, ", "))
		}
	}
	for _, f := range o.Enable {
		if slices.Contains(o.Disable, f) {
			return fmt.Errorf("feature %q both enabled and disabled", f)
		}
	}
	// A plugin that knows not which build it is would install an image
	// tag that exists nowhere, and every agent would sit in ImagePullBackOff.
	if o.Image == manifests.DefaultImage() && manifests.VersionSource == manifests.SourceNone && o.Output == "" {
		return fmt.Errorf("this kubectl-ebpf was built without version information (no -ldflags, no VCS stamp: GOFLAGS=-buildvcs=false?), so no agent image matches it: pass --image, or build it with `make build` or `go build -buildvcs=true`")
	}
	return nil
}

// Run applies (or prints) the manifests.
func (o *Options) Run(ctx context.Context) error {
	if !o.needsCluster() {
		if o.Output == "yaml" {
			fmt.Fprint(o.Out, offlineNote)
			return printYAML(o, o.objects)
		}
		fmt.Fprintln(o.ErrOut, "note: rendered without a cluster: default features, and KUBERNETES_SERVICE_HOST/PORT not set on the agent")
		for _, obj := range o.objects {
			fmt.Fprintf(o.Out, "%s created (dry run)\n", objectRef(obj))
		}
		return nil
	}
	c, _, err := o.Connect(ctx)
	if err != nil {
		return err
	}
	if err := Preflight(ctx, c); err != nil {
		return err
	}
	if err := o.renderForCluster(ctx); err != nil {
		return err
	}
	dry := o.DryRun == DryRunServer
	suffix := ""
	if dry {
		suffix = " (server dry run)"
	}
	var applied []*unstructured.Unstructured
	changed := false
	nsCreated := false
	if !dry {
		if err := o.waitNamespaceNotTerminating(ctx); err != nil {
			return err
		}
	}
	check, err := o.imageCheckPlan(ctx, dry)
	if err != nil {
		return err
	}
	for i, obj := range o.objects {
		// The check's pods run in the namespace, the first object; nothing
		// after it is applied unless every node runs the new images.
		if i == 1 && len(check) > 0 {
			if err := o.checkImages(ctx, check); err != nil {
				return errors.Join(err, o.undoNamespace(ctx, nsCreated))
			}
		}
		got, action, err := o.Clients.Apply(ctx, obj, dry)
		if err != nil {
			// A server dry run cannot create the namespace, so objects in it
			// are rejected as NotFound on a first install; that is expected.
			if dry && nsCreated && obj.GetNamespace() != "" && apierrors.IsNotFound(err) {
				fmt.Fprintf(o.Out, "%s created%s; not validated, namespace %s does not exist yet\n", objectRef(obj), suffix, obj.GetNamespace())
				applied = append(applied, obj)
				continue
			}
			return err
		}
		if obj.GetKind() == "Namespace" && action == kube.Created {
			nsCreated = true
		}
		if action != kube.Unchanged {
			changed = true
		}
		applied = append(applied, got)
		if o.Output == "" {
			fmt.Fprintf(o.Out, "%s %s%s\n", objectRef(obj), action, suffix)
		}
		if obj.GetKind() == "CustomResourceDefinition" && !dry {
			if err := o.Clients.WaitCRDEstablished(ctx, obj.GetName(), 30*time.Second); err != nil {
				return err
			}
		}
	}
	// With l7 off the Envoy DaemonSet must go, after the config: agents
	// stop steering to Envoy before it drains (see feature's disable).
	if !o.rendersEnvoy() {
		deleted, err := o.Clients.DeleteEnvoy(ctx, dry)
		if err != nil {
			return err
		}
		if deleted && o.Output == "" {
			fmt.Fprintf(o.Out, "daemonset.apps/%s deleted%s (l7 is disabled)\n", manifests.EnvoyDaemonSetName, suffix)
		}
		changed = changed || deleted
	}
	if o.Output == "yaml" {
		return printYAML(o, applied)
	}
	if dry {
		return nil
	}
	if changed {
		fmt.Fprintf(o.Out, "kubectl-ebpf installed (image %s)\n", o.Image)
	} else {
		fmt.Fprintf(o.Out, "kubectl-ebpf already installed (image %s): nothing changed\n", o.Image)
	}
	if !o.Wait {
		if changed {
			fmt.Fprintln(o.Out, "the agents roll out node by node: `kubectl ebpf status` shows each node (or install with --wait)")
		}
		return nil
	}
	return WaitReady(ctx, o.Clients, o.IOStreams, o.Timeout, o.PollInterval)
}

// imageCheckPlan lists the images checkImages must run before the
// rollout: none on a dry run, with --skip-image-check, or when the
// cluster runs them already.
func (o *Options) imageCheckPlan(ctx context.Context, dry bool) ([]checkedImage, error) {
	if dry || o.SkipImageCheck || o.Output != "" {
		return nil, nil
	}
	if len(o.objects) < 2 || o.objects[0].GetKind() != "Namespace" {
		return nil, fmt.Errorf("internal: the manifests do not start with the namespace")
	}
	return o.imagesToCheck(ctx)
}

// waitNamespaceNotTerminating waits for a namespace being deleted (an
// uninstall without --wait, a failed first install) to be gone: nothing
// can be created in it until then.
func (o *Options) waitNamespaceNotTerminating(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	printed := false
	for {
		ns, err := o.Clients.Kube.CoreV1().Namespaces().Get(ctx, manifests.Namespace, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			return nil
		case err != nil && ctx.Err() != nil:
			return fmt.Errorf("namespace %s is still being deleted after %s", manifests.Namespace, o.Timeout)
		case err != nil:
			return fmt.Errorf("get namespace %s: %w", manifests.Namespace, err)
		case ns.DeletionTimestamp == nil:
			return nil
		}
		if !printed {
			fmt.Fprintf(o.Out, "waiting for namespace %s, being deleted, to be gone\n", manifests.Namespace)
			printed = true
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("namespace %s is still being deleted after %s", manifests.Namespace, o.Timeout)
		case <-time.After(o.PollInterval):
		}
	}
}

// undoNamespace deletes the namespace when this install created it only
// for an image check that failed: a failed first install leaves nothing.
func (o *Options) undoNamespace(ctx context.Context, created bool) error {
	if !created {
		return nil
	}
	ns := o.objects[0]
	r, _, err := o.Clients.Resource(ns.GroupVersionKind(), "")
	if err == nil {
		err = r.Delete(ctx, ns.GetName(), metav1.DeleteOptions{})
	}
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete namespace %s created for the image check: %w", manifests.Namespace, err)
	}
	fmt.Fprintf(o.Out, "namespace/%s deleted (created for the image check)\n", manifests.Namespace)
	return nil
}

// rendersEnvoy reports whether the rendered objects hold the Envoy
// DaemonSet, that is whether the config they write enables l7.
func (o *Options) rendersEnvoy() bool {
	for _, obj := range o.objects {
		if obj.GetKind() == "DaemonSet" && obj.GetName() == manifests.EnvoyDaemonSetName {
			return true
		}
	}
	return false
}

// offlineNote heads `install -o yaml` output rendered without a cluster.
const offlineNote = `# Rendered without a cluster: the ConfigMap holds the default features (plus
# --enable/--disable), not the cluster's current ones, and the agent has no
# KUBERNETES_SERVICE_HOST/PORT, so on a cluster without kube-proxy it cannot reach
# the API server. "kubectl ebpf install" sets both from the live cluster.
`

// renderForCluster renders the manifests again with what only the cluster
// knows: its current features, so a re-install or upgrade never resets what
// `kubectl ebpf enable|disable` set, and the API server's real endpoint.
func (o *Options) renderForCluster(ctx context.Context) error {
	base := apiv1.DefaultConfig()
	cm, err := o.Clients.GetConfigMap(ctx)
	switch {
	case errors.Is(err, kube.ErrNotInstalled):
		// First install: the defaults.
	case err != nil:
		return err
	default:
		cfg, dropped, err := kube.LenientConfig(cm)
		if err != nil {
			fmt.Fprintf(o.ErrOut, "warning: %v; writing the default features\n", err)
			break
		}
		if len(dropped) > 0 {
			fmt.Fprintf(o.ErrOut, "warning: dropping unknown feature(s) %s from the config (known: %s)\n", strings.Join(dropped, ", "), strings.Join(apiv1.KnownFeatures, ", "))
		}
		base = cfg
	}
	cfg := o.withFlags(base)
	ro := manifests.RenderOptions{Config: &cfg}
	// Where earlier installs chained kebpf-cni: the new agent takes it out
	// of every pair this install does not chain into.
	ds, err := o.Clients.Kube.AppsV1().DaemonSets(manifests.Namespace).Get(ctx, manifests.DaemonSetName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return fmt.Errorf("get DaemonSet %s: %w", manifests.DaemonSetName, err)
	default:
		hist, err := manifests.CNIRecordOf(ds)
		if err != nil {
			fmt.Fprintf(o.ErrOut, "warning: %v; only the CNI dirs the DaemonSet mounts are known\n", err)
		}
		ro.CNIHistory = hist
	}
	host, port, err := o.Clients.APIServerEndpoint(ctx)
	if err != nil {
		// Not fatal: with kube-proxy the agent reaches the API through the
		// ClusterIP as any pod does.
		fmt.Fprintf(o.ErrOut, "warning: API server endpoint unknown (%v): the agent will use the kubernetes Service, which needs kube-proxy\n", err)
	} else {
		ro.APIServerHost, ro.APIServerPort = host, port
	}
	return o.render(ro)
}

// Permissions are what install (and the cleanup pods of uninstall) need.
func Permissions() []kube.Permission {
	crud := []string{"create", "patch", "get"}
	ns := manifests.Namespace
	var p []kube.Permission
	p = append(p, kube.Permissions("", "", []string{"namespaces"}, crud)...)
	p = append(p, kube.Permissions("", "apiextensions.k8s.io", []string{"customresourcedefinitions"}, crud)...)
	p = append(p, kube.Permissions("", "rbac.authorization.k8s.io", []string{"clusterroles", "clusterrolebindings"}, crud)...)
	p = append(p, kube.Permissions("", "admissionregistration.k8s.io", []string{"validatingadmissionpolicies", "validatingadmissionpolicybindings"}, crud)...)
	p = append(p, kube.Permissions(ns, "", []string{"serviceaccounts", "configmaps"}, crud)...)
	p = append(p, kube.Permissions(ns, "rbac.authorization.k8s.io", []string{"roles", "rolebindings"}, crud)...)
	// delete: the Envoy DaemonSet goes when an install leaves l7 off.
	p = append(p, kube.Permissions(ns, "apps", []string{"daemonsets"}, append(slices.Clone(crud), "delete"))...)
	// pods: the image check before a rollout, and uninstall's cleanup pods.
	p = append(p, kube.Permissions(ns, "", []string{"pods"}, []string{"create", "delete", "list", "get"})...)
	p = append(p, kube.Permission{Verb: "list", Resource: "nodes"})
	return p
}

// Preflight checks, before anything is applied (and after Connect found the
// cluster answering), that the user may create everything install creates,
// and that every node's kernel is new enough.
func Preflight(ctx context.Context, c *kube.Clients) error {
	if err := c.RequirePermissions(ctx, Permissions()); err != nil {
		return err
	}
	nodes, err := c.Kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list nodes: %w", err)
	}
	return kube.CheckKernels(nodes.Items)
}

// WaitReady prints each node's agent state whenever it changes, until the
// DaemonSet is rolled out and every node reports ready with exactly the
// configured features active, or timeout.
func WaitReady(ctx context.Context, c *kube.Clients, streams genericiooptions.IOStreams, timeout, interval time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	last := map[string]string{}
	var r *health.Report
	for {
		var err error
		r, err = health.Collect(ctx, c, time.Now())
		if err != nil && ctx.Err() == nil {
			return err
		}
		if err == nil {
			for _, n := range r.Nodes {
				if last[n.Name] != n.State() {
					fmt.Fprintf(streams.Out, "node %s: %s\n", n.Name, n.State())
					last[n.Name] = n.State()
				}
			}
			if r.Settled() {
				fmt.Fprintf(streams.Out, "agents ready on %d node(s)\n", len(r.Nodes))
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return timeoutError(timeout, r)
		case <-time.After(interval):
		}
	}
}

func timeoutError(timeout time.Duration, r *health.Report) error {
	if r == nil {
		return fmt.Errorf("timed out after %s waiting for the agents", timeout)
	}
	if !r.Installed {
		return fmt.Errorf("timed out after %s: %s is missing", timeout, r.Missing())
	}
	if nr := r.NotReady(); len(nr) > 0 {
		return fmt.Errorf("timed out after %s: not ready: %s", timeout, strings.Join(nr, ", "))
	}
	if r.ConfigError != "" {
		return fmt.Errorf("timed out after %s: %s", timeout, r.ConfigError)
	}
	if r.EnvoyError != "" {
		return fmt.Errorf("timed out after %s: %s", timeout, r.EnvoyError)
	}
	if r.RolledOut() {
		var off, envoy []string
		for _, n := range r.Nodes {
			switch {
			case n.Converged:
			case n.WaitsForEnvoy():
				envoy = append(envoy, n.Name)
			default:
				off = append(off, fmt.Sprintf("%s (active %s)", n.Name, strings.Join(n.Active, ",")))
			}
		}
		if len(off) > 0 {
			return fmt.Errorf("timed out after %s: features %s not active on: %s", timeout, strings.Join(r.Configured, ","), strings.Join(off, ", "))
		}
		if len(envoy) > 0 {
			return fmt.Errorf("timed out after %s: Envoy not ready on: %s", timeout, strings.Join(envoy, ", "))
		}
		if e := r.Envoy; e != nil {
			return fmt.Errorf("timed out after %s: DaemonSet %s not rolled out (desired %d, ready %d, updated %d)", timeout, e.Name, e.Desired, e.Ready, e.Updated)
		}
	}
	d := r.DaemonSet
	return fmt.Errorf("timed out after %s: DaemonSet %s not rolled out (desired %d, ready %d, updated %d)", timeout, d.Name, d.Desired, d.Ready, d.Updated)
}

func printYAML(o *Options, objs []*unstructured.Unstructured) error {
	for i, obj := range objs {
		if i > 0 {
			fmt.Fprintln(o.Out, "---")
		}
		// Server dry-run results carry managedFields, noise in a manifest.
		obj = obj.DeepCopy()
		obj.SetManagedFields(nil)
		if err := cmdutil.PrintYAML(o.Out, obj.Object); err != nil {
			return err
		}
	}
	return nil
}

// objectRef names an object the way kubectl does: kind.group/name.
func objectRef(obj *unstructured.Unstructured) string {
	gvk := obj.GroupVersionKind()
	ref := strings.ToLower(gvk.Kind)
	if gvk.Group != "" {
		ref += "." + gvk.Group
	}
	return ref + "/" + obj.GetName()
}

// imageVersion is the tag of image, which the agent labels carry.
func imageVersion(image string) string {
	// A digest is no version, and label values stop at 63 characters.
	if strings.Contains(image, "@") {
		return manifests.Version
	}
	if i := strings.LastIndex(image, ":"); i > strings.LastIndex(image, "/") && len(image)-i-1 <= 63 {
		return image[i+1:]
	}
	return manifests.Version
}
