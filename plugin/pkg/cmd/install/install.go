// Package install implements `kubectl ebpf install`.
package install

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"

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
	Flags *genericclioptions.ConfigFlags
	genericiooptions.IOStreams

	Image   string
	Wait    bool
	Timeout time.Duration
	DryRun  string
	Output  string

	// Clients may be preset (tests); Complete builds them otherwise.
	Clients *kube.Clients
	// PollInterval is how often --wait re-reads the cluster.
	PollInterval time.Duration

	objects []*unstructured.Unstructured
}

// NewCmd returns the install command.
func NewCmd(flags *genericclioptions.ConfigFlags, streams genericiooptions.IOStreams) *cobra.Command {
	o := &Options{Flags: flags, IOStreams: streams, PollInterval: 2 * time.Second}
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Install or upgrade the node agents",
		Long: "Checks permissions and node kernels, then server-side applies the namespace, CRD, RBAC, " +
			"config and the agent DaemonSet. Running it again is a no-op, or an upgrade when --image differs.",
		Example: "  kubectl ebpf install --wait\n  kubectl ebpf install -o yaml > kubectl-ebpf.yaml",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.Complete(); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			return o.Run(cmd.Context())
		},
	}
	cmd.Flags().StringVar(&o.Image, "image", manifests.DefaultImage(), "agent image")
	cmd.Flags().BoolVar(&o.Wait, "wait", false, "wait until the agent is ready on every node")
	cmd.Flags().DurationVar(&o.Timeout, "timeout", 5*time.Minute, "how long --wait waits")
	cmd.Flags().StringVar(&o.DryRun, "dry-run", DryRunNone, `"none", "client" (print what would be applied) or "server" (validate with the API server, persist nothing)`)
	cmd.Flags().Lookup("dry-run").NoOptDefVal = DryRunClient
	cmd.Flags().StringVarP(&o.Output, "output", "o", "", `"yaml" prints the manifests instead of applying them`)
	return cmd
}

// Complete fills in defaults and renders the manifests.
func (o *Options) Complete() error {
	if o.DryRun == "" {
		o.DryRun = DryRunNone
	}
	if o.Image == "" {
		o.Image = manifests.DefaultImage()
	}
	objs, err := manifests.Objects(manifests.RenderOptions{Image: o.Image, Version: imageVersion(o.Image)})
	if err != nil {
		return err
	}
	o.objects = objs
	return nil
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
	if o.Timeout <= 0 {
		return fmt.Errorf("invalid --timeout %s: must be positive", o.Timeout)
	}
	if o.Wait && (o.DryRun != DryRunNone || o.Output != "") {
		return fmt.Errorf("--wait cannot be combined with --dry-run or -o")
	}
	return nil
}

// Run applies (or prints) the manifests.
func (o *Options) Run(ctx context.Context) error {
	if !o.needsCluster() {
		if o.Output == "yaml" {
			return printYAML(o, o.objects)
		}
		for _, obj := range o.objects {
			fmt.Fprintf(o.Out, "%s created (dry run)\n", objectRef(obj))
		}
		return nil
	}
	if err := o.connect(); err != nil {
		return err
	}
	if err := Preflight(ctx, o.Clients); err != nil {
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
	for _, obj := range o.objects {
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
		return nil
	}
	return WaitReady(ctx, o.Clients, o.IOStreams, o.Timeout, o.PollInterval)
}

// Permissions are what install (and the cleanup pods of uninstall) need.
func Permissions() []kube.Permission {
	crud := []string{"create", "patch", "get"}
	ns := manifests.Namespace
	var p []kube.Permission
	p = append(p, kube.Permissions("", "", []string{"namespaces"}, crud)...)
	p = append(p, kube.Permissions("", "apiextensions.k8s.io", []string{"customresourcedefinitions"}, crud)...)
	p = append(p, kube.Permissions("", "rbac.authorization.k8s.io", []string{"clusterroles", "clusterrolebindings"}, crud)...)
	p = append(p, kube.Permissions(ns, "", []string{"serviceaccounts", "configmaps"}, crud)...)
	p = append(p, kube.Permissions(ns, "rbac.authorization.k8s.io", []string{"roles", "rolebindings"}, crud)...)
	p = append(p, kube.Permissions(ns, "apps", []string{"daemonsets"}, crud)...)
	p = append(p, kube.Permissions(ns, "", []string{"pods"}, []string{"create", "delete"})...)
	p = append(p, kube.Permission{Verb: "list", Resource: "nodes"})
	return p
}

// Preflight checks, before anything is applied, that the cluster answers,
// that the user may create everything install creates, and that every node's
// kernel is new enough.
func Preflight(ctx context.Context, c *kube.Clients) error {
	if _, err := c.Reachable(ctx); err != nil {
		return err
	}
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
// DaemonSet is rolled out and every node reports ready, or timeout.
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
			if r.Healthy() {
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

// connect builds the clients unless a test preset them. It runs after
// Validate so bad flags are reported before a bad kubeconfig; it makes no API call.
func (o *Options) connect() error {
	if o.Clients != nil {
		return nil
	}
	c, err := kube.New(o.Flags)
	if err != nil {
		return err
	}
	o.Clients = c
	return nil
}
