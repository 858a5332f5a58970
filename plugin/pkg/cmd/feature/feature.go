// Package feature implements `kubectl ebpf enable` and `kubectl ebpf disable`:
// they switch one datapath feature in the agent ConfigMap, which every agent
// watches and follows within seconds, without a restart.
package feature

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
)

// Options are the inputs of one enable or disable.
type Options struct {
	kube.Conn
	genericiooptions.IOStreams

	// Enable is true for `enable`, false for `disable`.
	Enable  bool
	Feature string
	Wait    bool
	Timeout time.Duration

	// PollInterval is how often --wait re-reads the NodeStates.
	PollInterval time.Duration
}

// NewEnableCmd returns the enable command.
func NewEnableCmd(flags *genericclioptions.ConfigFlags, streams genericiooptions.IOStreams) *cobra.Command {
	return newCmd(flags, streams, true)
}

// NewDisableCmd returns the disable command.
func NewDisableCmd(flags *genericclioptions.ConfigFlags, streams genericiooptions.IOStreams) *cobra.Command {
	return newCmd(flags, streams, false)
}

func newCmd(flags *genericclioptions.ConfigFlags, streams genericiooptions.IOStreams, enable bool) *cobra.Command {
	o := &Options{Conn: kube.Conn{Flags: flags}, IOStreams: streams, Enable: enable, PollInterval: time.Second}
	verb, does := "enable", "attach"
	if !enable {
		verb, does = "disable", "detach"
	}
	known := strings.Join(apiv1.KnownFeatures, ", ")
	cmd := &cobra.Command{
		Use:   verb + " FEATURE",
		Short: strings.ToUpper(verb[:1]) + verb[1:] + " a datapath feature on every node (" + known + ")",
		Long: "Sets features.FEATURE to " + fmt.Sprint(enable) + " in ConfigMap " + manifests.Namespace + "/" + manifests.ConfigMapName +
			", leaving the other features as they are. Every agent watches that ConfigMap and " + does +
			"es the feature within seconds, without a restart. With --wait the command returns once every node reports it.\n\n" +
			"l7 also runs the node-local Envoy: `enable l7` first creates the DaemonSet " + manifests.EnvoyDaemonSetName +
			" (with the Envoy image install recorded), and --wait also waits for every node's Envoy to be ready; `disable l7` " +
			"deletes that DaemonSet after switching the feature off, so agents stop steering to Envoy while it drains.",
		Example: "  kubectl ebpf " + verb + " service-lb --wait",
		Args:    cobra.ArbitraryArgs, // Validate says what is wrong, naming the known features
		ValidArgsFunction: func(_ *cobra.Command, args []string, _ string) ([]cobra.Completion, cobra.ShellCompDirective) {
			if len(args) > 0 {
				return nil, cobra.ShellCompDirectiveNoFileComp
			}
			return slices.Clone(apiv1.KnownFeatures), cobra.ShellCompDirectiveNoFileComp
		},
		RunE: cmdutil.RunE(o),
	}
	cmd.Flags().BoolVar(&o.Wait, "wait", false, "wait until every node reports the feature "+map[bool]string{true: "active", false: "inactive"}[enable])
	cmd.Flags().DurationVar(&o.Timeout, "timeout", 2*time.Minute, "how long --wait waits")
	return cmd
}

func (o *Options) verb() string {
	if o.Enable {
		return "enable"
	}
	return "disable"
}

// Complete takes the feature name from args.
func (o *Options) Complete(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("%s needs exactly one feature, one of: %s", o.verb(), strings.Join(apiv1.KnownFeatures, ", "))
	}
	o.Feature = args[0]
	if o.PollInterval <= 0 {
		o.PollInterval = time.Second
	}
	return nil
}

// Validate checks the feature name and flags; it makes no API call.
func (o *Options) Validate() error {
	if !slices.Contains(apiv1.KnownFeatures, o.Feature) {
		return fmt.Errorf("unknown feature %q: known features are %s", o.Feature, strings.Join(apiv1.KnownFeatures, ", "))
	}
	return cmdutil.ValidateTimeout(o.Timeout)
}

// Run switches the feature and, with --wait, follows the nodes.
func (o *Options) Run(ctx context.Context) error {
	if _, _, err := o.Connect(ctx); err != nil {
		return err
	}
	l7 := o.Feature == apiv1.FeatureL7
	if l7 && o.Enable {
		if err := o.applyEnvoy(ctx); err != nil {
			return err
		}
	}
	changed, dropped, err := o.Clients.SetFeature(ctx, o.Feature, o.Enable)
	if err != nil {
		return err
	}
	if len(dropped) > 0 {
		fmt.Fprintf(o.ErrOut, "warning: removed unknown feature(s) %s from the config (known: %s)\n", strings.Join(dropped, ", "), strings.Join(apiv1.KnownFeatures, ", "))
	}
	if changed {
		fmt.Fprintf(o.Out, "feature %s %sd\n", o.Feature, o.verb())
	} else {
		fmt.Fprintf(o.Out, "feature %s already %sd: nothing changed\n", o.Feature, o.verb())
	}
	// Deleted after the config: agents stop steering to Envoy first, and
	// its pods drain (preStop) over the seconds the agents take.
	if l7 && !o.Enable {
		deleted, err := o.Clients.DeleteEnvoy(ctx, false)
		if err != nil {
			return err
		}
		if deleted {
			fmt.Fprintf(o.Out, "daemonset.apps/%s deleted\n", manifests.EnvoyDaemonSetName)
		}
	}
	if !o.Wait {
		return nil
	}
	return WaitNodes(ctx, o.Clients, o.IOStreams, o.Feature, o.Enable, o.Timeout, o.PollInterval)
}

// applyEnvoy applies the Envoy DaemonSet before l7 is switched on: its
// pods start while the agents load the feature, and a failure (no
// permission, no agent DaemonSet) leaves the config as it was. Applied
// even when l7 is already on, which repairs a deleted DaemonSet.
func (o *Options) applyEnvoy(ctx context.Context) error {
	if _, err := o.Clients.GetConfigMap(ctx); err != nil {
		return err
	}
	obj, warning, err := o.Clients.RenderEnvoy(ctx)
	if err != nil {
		return err
	}
	if warning != "" {
		fmt.Fprintln(o.ErrOut, "warning: "+warning)
	}
	_, action, err := o.Clients.Apply(ctx, obj, false)
	if err != nil {
		return err
	}
	fmt.Fprintf(o.Out, "daemonset.apps/%s %s\n", obj.GetName(), action)
	return nil
}

// WaitNodes waits until every node's NodeState lists feature in
// status.active (enable) or no longer does (disable), printing each node's
// progress when it changes. A node without a NodeState counts as pending.
func WaitNodes(ctx context.Context, c *kube.Clients, streams genericiooptions.IOStreams, feature string, enable bool, timeout, interval time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	want := "active"
	if !enable {
		want = "inactive"
	}
	last := map[string]string{}
	var pending []string
	for {
		p, states, err := pendingNodes(ctx, c, feature, enable)
		if err != nil && ctx.Err() == nil {
			return err
		}
		if err == nil {
			pending = p
			names := make([]string, 0, len(states))
			for n := range states {
				names = append(names, n)
			}
			sort.Strings(names)
			for _, n := range names {
				if last[n] != states[n] {
					fmt.Fprintf(streams.Out, "node %s: %s\n", n, states[n])
					last[n] = states[n]
				}
			}
			if len(pending) == 0 {
				fmt.Fprintf(streams.Out, "feature %s %s on %d node(s)\n", feature, want, len(states))
				return nil
			}
		}
		select {
		case <-ctx.Done():
			if pending == nil {
				return fmt.Errorf("timed out after %s waiting for feature %s to be %s: %w", timeout, feature, want, ctx.Err())
			}
			return fmt.Errorf("timed out after %s waiting for feature %s to be %s on node(s) %s", timeout, feature, want, strings.Join(pending, ", "))
		case <-time.After(interval):
		}
	}
}

// pendingNodes returns the nodes not yet in the wanted state, sorted, and a
// progress word per node.
func pendingNodes(ctx context.Context, c *kube.Clients, feature string, enable bool) ([]string, map[string]string, error) {
	nodes, err := c.Kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, nil, fmt.Errorf("list nodes: %w", err)
	}
	list, err := c.NodeStates().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, nil, fmt.Errorf("list nodestates: %w", err)
	}
	active := map[string][]string{}
	reported := map[string]bool{}
	errs := map[string][]string{}
	envoyReady := map[string]bool{}
	for _, ns := range list.Items {
		active[ns.Name] = ns.Status.Active
		errs[ns.Name] = ns.Status.Errors
		reported[ns.Name] = true
		envoyReady[ns.Name] = ns.Status.L7 != nil && ns.Status.L7.EnvoyReady
	}
	// l7 is of use only with the node's Envoy ready: until then connections
	// to selected pods fail (closed), so enabling waits for it too.
	needEnvoy := enable && feature == apiv1.FeatureL7
	pending := []string{}
	states := map[string]string{}
	for _, n := range nodes.Items {
		has := slices.Contains(active[n.Name], feature)
		done := reported[n.Name] && has == enable && (!needEnvoy || envoyReady[n.Name])
		switch {
		case !reported[n.Name]:
			states[n.Name] = "waiting (no NodeState reported)"
		case done && enable:
			states[n.Name] = feature + " active"
		case done:
			states[n.Name] = feature + " inactive"
		case has == enable:
			states[n.Name] = "waiting (" + feature + " active, Envoy not ready)"
		default:
			s := "waiting (active: " + dash(strings.Join(active[n.Name], ",")) + ")"
			if e := errs[n.Name]; len(e) > 0 {
				s += " errors: " + strings.Join(e, "; ")
			}
			states[n.Name] = s
		}
		if !done {
			pending = append(pending, n.Name)
		}
	}
	sort.Strings(pending)
	return pending, states, nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
