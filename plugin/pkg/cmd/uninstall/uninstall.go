// Package uninstall implements `kubectl ebpf uninstall`.
package uninstall

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	"k8s.io/utils/ptr"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
)

// CleanupName labels the per-node cleanup pods (app.kubernetes.io/name).
const CleanupName = "kebpf-cleanup"

// Options are the inputs of one uninstall.
type Options struct {
	kube.Conn
	genericiooptions.IOStreams

	Wait        bool
	Timeout     time.Duration
	SkipCleanup bool

	PollInterval time.Duration

	cniDirs []manifests.CNIDirs // every pair of dirs an install chained kebpf-cni into
}

// NewCmd returns the uninstall command.
func NewCmd(flags *genericclioptions.ConfigFlags, streams genericiooptions.IOStreams) *cobra.Command {
	o := &Options{Conn: kube.Conn{Flags: flags}, IOStreams: streams, PollInterval: time.Second}
	cmd := &cobra.Command{
		Use:   "uninstall",
		Short: "Remove the agents, their BPF state on every node, and every object install created",
		Long: "Deletes the agent DaemonSet, runs a cleanup pod on every node that detaches and unpins " +
			"all of kubectl-ebpf's BPF programs, maps and links, then deletes every object labelled " +
			manifests.ManagedSelector + " (the namespace last).",
		Args: cobra.NoArgs,
		RunE: cmdutil.RunE(o),
	}
	cmd.Flags().BoolVar(&o.Wait, "wait", false, "wait until the namespace and the CRD are gone")
	cmd.Flags().DurationVar(&o.Timeout, "timeout", 5*time.Minute, "how long uninstall may take")
	cmd.Flags().BoolVar(&o.SkipCleanup, "skip-node-cleanup", false, "do not run the per-node BPF cleanup (e.g. when the agent image is gone); pins may remain on the nodes")
	return cmd
}

// Complete fills in defaults.
func (o *Options) Complete(_ []string) error {
	if o.PollInterval <= 0 {
		o.PollInterval = time.Second
	}
	return nil
}

// Validate checks the flags.
func (o *Options) Validate() error {
	return cmdutil.ValidateTimeout(o.Timeout)
}

// Permissions are what uninstall needs.
func Permissions() []kube.Permission {
	ns := manifests.Namespace
	var p []kube.Permission
	p = append(p, kube.Permissions(ns, "", []string{"pods"}, []string{"list", "create", "delete"})...)
	p = append(p, kube.Permission{Verb: "get", Resource: "pods/log", Namespace: ns})
	p = append(p, kube.Permissions(ns, "apps", []string{"daemonsets"}, []string{"get", "delete"})...)
	p = append(p, kube.Permissions("", "", []string{"namespaces"}, []string{"get", "delete"})...)
	p = append(p, kube.Permissions("", "apiextensions.k8s.io", []string{"customresourcedefinitions"}, []string{"list", "delete"})...)
	p = append(p, kube.Permissions("", "rbac.authorization.k8s.io", []string{"clusterroles", "clusterrolebindings"}, []string{"list", "delete"})...)
	p = append(p, kube.Permissions("", "admissionregistration.k8s.io", []string{"validatingadmissionpolicies", "validatingadmissionpolicybindings"}, []string{"list", "delete"})...)
	p = append(p, kube.Permission{Verb: "list", Resource: "nodes"})
	return p
}

// Run uninstalls.
func (o *Options) Run(ctx context.Context) error {
	c, _, err := o.Connect(ctx)
	if err != nil {
		return err
	}
	if err := c.RequirePermissions(ctx, Permissions()); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()

	ns, err := c.Kube.CoreV1().Namespaces().Get(ctx, manifests.Namespace, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		ns = nil
	} else if err != nil {
		return fmt.Errorf("get namespace %s: %w", manifests.Namespace, err)
	}
	leftovers, err := o.clusterObjects(ctx)
	if err != nil {
		return err
	}
	if ns == nil && leftovers == 0 {
		fmt.Fprintln(o.Out, "nothing to uninstall")
		return nil
	}
	if ns != nil && ns.DeletionTimestamp != nil {
		// Deleted without uninstall (kubectl delete ns): let it go, then
		// clean the nodes from a namespace of our own below.
		fmt.Fprintf(o.Out, "namespace %s is being deleted; waiting for it to go\n", manifests.Namespace)
		if err := o.waitNamespaceGone(ctx); err != nil {
			return err
		}
		ns = nil
	}

	image := manifests.DefaultImage()
	// Without the DaemonSet (an interrupted uninstall) the CNI dirs it
	// recorded are unknown: the defaults are cleaned, which is harmless
	// where we never chained.
	o.cniDirs = []manifests.CNIDirs{{Conf: manifests.DefaultCNIConfDir, Bin: manifests.DefaultCNIBinDir}}
	if ns != nil {
		ds, err := c.Kube.AppsV1().DaemonSets(manifests.Namespace).Get(ctx, manifests.DaemonSetName, metav1.GetOptions{})
		switch {
		case err == nil:
			image = kube.AgentImage(ds)
			// Every dir any install chained into, whatever the current
			// install's flags (--no-cni-chaining mounts none).
			dirs, err := manifests.CNIRecordOf(ds)
			if err != nil {
				fmt.Fprintf(o.ErrOut, "warning: %v; cleaning the CNI dirs the DaemonSet mounts and the defaults\n", err)
				dirs = append(dirs, o.cniDirs...)
			}
			o.cniDirs = dirs
			// Background: the pods are waited for below; foreground deletion
			// would also need the garbage collector to finish first.
			if err := c.Kube.AppsV1().DaemonSets(manifests.Namespace).Delete(ctx, ds.Name, metav1.DeleteOptions{PropagationPolicy: ptr.To(metav1.DeletePropagationBackground)}); err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("delete DaemonSet %s: %w", ds.Name, err)
			}
			fmt.Fprintf(o.Out, "daemonset.apps/%s deleted\n", ds.Name)
		case !apierrors.IsNotFound(err):
			return fmt.Errorf("get DaemonSet %s: %w", manifests.DaemonSetName, err)
		}
		// The agents must be gone before the cleanup, or one could re-pin what
		// the cleanup removed.
		if err := o.waitPodsGone(ctx, manifests.AgentSelector, "agent pods"); err != nil {
			return err
		}
		if o.SkipCleanup {
			fmt.Fprintln(o.Out, "skipping BPF cleanup on the nodes (--skip-node-cleanup)")
		} else if ns.DeletionTimestamp == nil {
			if err := o.cleanupWithFallback(ctx, image); err != nil {
				return err
			}
		}
	}
	if ns == nil && !o.SkipCleanup {
		// The namespace went without uninstall, but the nodes may still hold
		// the pinned datapath (it outlives the agents by design): recreate
		// the namespace for the cleanup pods; deleteManaged removes it.
		if err := o.recreateNamespace(ctx); err != nil {
			return err
		}
		if err := o.cleanupWithFallback(ctx, image); err != nil {
			return err
		}
	}
	// The Envoy DaemonSet (l7) goes here, with the other labelled objects:
	// after the cleanup, since the steering the agents left pinned sends
	// selected connections to it until the cleanup detaches it.
	if err := o.deleteManaged(ctx); err != nil {
		return err
	}
	if o.Wait {
		if err := o.waitGone(ctx); err != nil {
			return err
		}
	}
	fmt.Fprintln(o.Out, "kubectl-ebpf uninstalled")
	return nil
}

// waitNamespaceGone waits until our namespace no longer exists.
func (o *Options) waitNamespaceGone(ctx context.Context) error {
	err := wait.PollUntilContextCancel(ctx, o.PollInterval, true, func(ctx context.Context) (bool, error) {
		_, err := o.Clients.Kube.CoreV1().Namespaces().Get(ctx, manifests.Namespace, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		return false, err
	})
	if err != nil {
		return fmt.Errorf("wait for namespace %s to be deleted: %w", manifests.Namespace, err)
	}
	return nil
}

// recreateNamespace creates our namespace (labelled, so deleteManaged takes
// it away again) and waits for its default ServiceAccount, without which no
// pod can be created in it.
func (o *Options) recreateNamespace(ctx context.Context) error {
	n := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: manifests.Namespace, Labels: manifests.CommonLabels()}}
	if _, err := o.Clients.Kube.CoreV1().Namespaces().Create(ctx, n, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("recreate namespace %s for the node cleanup: %w", manifests.Namespace, err)
	}
	fmt.Fprintf(o.Out, "namespace/%s recreated for the node cleanup\n", manifests.Namespace)
	err := wait.PollUntilContextCancel(ctx, o.PollInterval, true, func(ctx context.Context) (bool, error) {
		_, err := o.Clients.Kube.CoreV1().ServiceAccounts(manifests.Namespace).Get(ctx, "default", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		return err == nil, err
	})
	if err != nil {
		return fmt.Errorf("wait for the default ServiceAccount of %s: %w", manifests.Namespace, err)
	}
	return nil
}

// errCleanupImage marks a cleanup that could not start because its image
// cannot be pulled on some node.
var errCleanupImage = errors.New("cleanup image unavailable")

// cleanupWithFallback runs the node cleanup with the installed agent's image
// and, when that image cannot run (an install with a broken --image), with
// this plugin's own default image: a broken install must stay removable.
func (o *Options) cleanupWithFallback(ctx context.Context, image string) error {
	err := o.cleanupNodes(ctx, image)
	fallback := manifests.DefaultImage()
	if err == nil || !errors.Is(err, errCleanupImage) || fallback == image {
		return err
	}
	fmt.Fprintf(o.Out, "cleanup with %s cannot start (%v); retrying with %s\n", image, err, fallback)
	return o.cleanupNodes(ctx, fallback)
}

// clusterObjects counts the cluster-scoped objects install creates that still exist.
func (o *Options) clusterObjects(ctx context.Context) (int, error) {
	sel := metav1.ListOptions{LabelSelector: manifests.ManagedSelector}
	n := 0
	crds, err := o.Clients.Dynamic.Resource(kube.CRDGVR).List(ctx, sel)
	if err != nil {
		return 0, fmt.Errorf("list CRDs: %w", err)
	}
	n += len(crds.Items)
	crs, err := o.Clients.Kube.RbacV1().ClusterRoles().List(ctx, sel)
	if err != nil {
		return 0, fmt.Errorf("list ClusterRoles: %w", err)
	}
	n += len(crs.Items)
	crbs, err := o.Clients.Kube.RbacV1().ClusterRoleBindings().List(ctx, sel)
	if err != nil {
		return 0, fmt.Errorf("list ClusterRoleBindings: %w", err)
	}
	n += len(crbs.Items)
	vaps, err := o.Clients.Kube.AdmissionregistrationV1().ValidatingAdmissionPolicies().List(ctx, sel)
	if err != nil {
		return 0, fmt.Errorf("list ValidatingAdmissionPolicies: %w", err)
	}
	n += len(vaps.Items)
	vapbs, err := o.Clients.Kube.AdmissionregistrationV1().ValidatingAdmissionPolicyBindings().List(ctx, sel)
	if err != nil {
		return 0, fmt.Errorf("list ValidatingAdmissionPolicyBindings: %w", err)
	}
	return n + len(vapbs.Items), nil
}

func (o *Options) waitPodsGone(ctx context.Context, selector, what string) error {
	pods := o.Clients.Kube.CoreV1().Pods(manifests.Namespace)
	printed := false
	err := wait.PollUntilContextCancel(ctx, o.PollInterval, true, func(ctx context.Context) (bool, error) {
		l, err := pods.List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return false, err
		}
		if len(l.Items) > 0 && !printed {
			fmt.Fprintf(o.Out, "waiting for %d %s to stop\n", len(l.Items), what)
			printed = true
		}
		return len(l.Items) == 0, nil
	})
	if err != nil {
		return fmt.Errorf("wait for %s to stop: %w", what, err)
	}
	return nil
}

// cleanupNodes runs one cleanup pod per node and reports each node's log.
func (o *Options) cleanupNodes(ctx context.Context, image string) error {
	c := o.Clients
	cleanupSel := manifests.LabelName + "=" + CleanupName
	// Leftovers of an interrupted uninstall would be mistaken for this run's.
	if err := c.DeletePods(ctx, manifests.Namespace, cleanupSel); err != nil {
		return fmt.Errorf("delete old cleanup pods: %w", err)
	}
	if err := o.waitPodsGone(ctx, cleanupSel, "old cleanup pods"); err != nil {
		return err
	}
	ready, notReady, err := c.ReadyNodes(ctx)
	if err != nil {
		return err
	}
	for _, n := range notReady {
		fmt.Fprintf(o.Out, "node %s: not ready, skipping BPF cleanup\n", n)
	}
	var failures []string
	imageStuck := 0 // failures caused by an image the node cannot get
	err = c.RunOnNodes(ctx, manifests.Namespace, cleanupSel, ready,
		func(node string) *corev1.Pod { return CleanupPod(node, image, o.cniDirs) }, o.PollInterval,
		func(r kube.PodRun) {
			switch {
			case r.Succeeded:
				o.printLog(ctx, r.Node, r.Pod)
				fmt.Fprintf(o.Out, "node %s: clean\n", r.Node)
			case r.Failed:
				tail := o.printLog(ctx, r.Node, r.Pod)
				failures = append(failures, fmt.Sprintf("node %s: %s", r.Node, orElse(tail, "exit status non-zero")))
			default:
				failures = append(failures, fmt.Sprintf("node %s: cleanup pod %s", r.Node, r.Stuck))
				imageStuck += boolToInt(strings.Contains(r.Stuck, "Image"))
			}
		})
	var pending *kube.PendingError
	if errors.As(err, &pending) {
		return fmt.Errorf("timed out waiting for BPF cleanup on node(s) %s", strings.Join(pending.Nodes, ", "))
	}
	if err != nil {
		return fmt.Errorf("cleanup pods: %w", err)
	}
	if len(failures) > 0 {
		slices.Sort(failures)
		err := fmt.Errorf("BPF cleanup failed on %s; objects left in place so uninstall can be retried", strings.Join(failures, ", "))
		if imageStuck == len(failures) {
			err = fmt.Errorf("%w: %w", errCleanupImage, err)
		}
		return err
	}
	return nil
}

func boolToInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// printLog prints the pod's log prefixed with the node and returns its last line.
func (o *Options) printLog(ctx context.Context, node, pod string) string {
	b, err := o.Clients.Kube.CoreV1().Pods(manifests.Namespace).GetLogs(pod, &corev1.PodLogOptions{}).DoRaw(ctx)
	if err != nil {
		fmt.Fprintf(o.Out, "node %s: (no cleanup log: %v)\n", node, err)
		return ""
	}
	last := ""
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		if line == "" {
			continue
		}
		fmt.Fprintf(o.Out, "node %s: %s\n", node, line)
		last = line
	}
	return last
}

// CleanupPod is the privileged pod, pinned to node, that removes our BPF
// state and takes kebpf-cni out of every pair of CNI dirs in cni.
func CleanupPod(node, image string, cni []manifests.CNIDirs) *corev1.Pod {
	bidir := corev1.MountPropagationBidirectional
	hostDir := corev1.HostPathDirectoryOrCreate
	p := kube.NodePod(CleanupName, node, 5)
	p.Spec.Containers = []corev1.Container{{
		Name:            "cleanup",
		Image:           image,
		ImagePullPolicy: corev1.PullIfNotPresent,
		Command:         []string{"/usr/local/bin/kebpf-agent"},
		Args:            []string{"cleanup"},
		SecurityContext: &corev1.SecurityContext{Privileged: ptr.To(true)},
		VolumeMounts: []corev1.VolumeMount{
			{Name: "bpffs", MountPath: "/sys/fs/bpf", MountPropagation: &bidir},
			{Name: "run", MountPath: "/run/kubectl-ebpf", MountPropagation: &bidir},
		},
	}}
	p.Spec.Volumes = []corev1.Volume{
		{Name: "bpffs", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/sys/fs/bpf", Type: &hostDir}}},
		{Name: "run", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/run/kubectl-ebpf", Type: &hostDir}}},
	}
	// Unchained before the BPF objects go, so no new pod waits for an
	// agent that is gone (nodeagent/cni).
	c := &p.Spec.Containers[0]
	for i, d := range cni {
		m := manifests.CNIStaleMount(i)
		conf, bin := fmt.Sprintf("cni-%d-conf", i), fmt.Sprintf("cni-%d-bin", i)
		c.Args = append(c.Args, "--cni-unchain="+m.Conf+":"+m.Bin)
		c.VolumeMounts = append(c.VolumeMounts,
			corev1.VolumeMount{Name: conf, MountPath: m.Conf}, corev1.VolumeMount{Name: bin, MountPath: m.Bin})
		p.Spec.Volumes = append(p.Spec.Volumes,
			corev1.Volume{Name: conf, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: d.Conf}}},
			corev1.Volume{Name: bin, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: d.Bin}}})
	}
	return p
}

// deleteManaged deletes, by label, every kind of object install creates:
// namespaced ones, then cluster-scoped ones, the namespace last.
func (o *Options) deleteManaged(ctx context.Context) error {
	objs, err := manifests.Objects(manifests.RenderOptions{})
	if err != nil {
		return err
	}
	var nsKinds, clusterKinds []int
	for i, obj := range objs {
		if obj.GetKind() == "Namespace" {
			continue
		}
		if obj.GetNamespace() != "" {
			nsKinds = append(nsKinds, i)
		} else {
			clusterKinds = append(clusterKinds, i)
		}
	}
	seen := map[string]bool{}
	for _, i := range slices.Concat(nsKinds, clusterKinds) {
		gvk := objs[i].GroupVersionKind()
		if seen[gvk.String()] {
			continue
		}
		seen[gvk.String()] = true
		ri, m, err := o.Clients.Resource(gvk, manifests.Namespace)
		if err != nil {
			return err
		}
		l, err := ri.List(ctx, metav1.ListOptions{LabelSelector: manifests.ManagedSelector})
		if err != nil {
			if apierrors.IsNotFound(err) || meta.IsNoMatchError(err) {
				continue
			}
			return fmt.Errorf("list %s: %w", m.Resource.Resource, err)
		}
		for _, item := range l.Items {
			if item.GetDeletionTimestamp() != nil {
				continue
			}
			if err := ri.Delete(ctx, item.GetName(), metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("delete %s %s: %w", gvk.Kind, item.GetName(), err)
			}
			fmt.Fprintf(o.Out, "%s/%s deleted\n", ref(gvk.Kind, gvk.Group), item.GetName())
		}
	}
	ns, err := o.Clients.Kube.CoreV1().Namespaces().Get(ctx, manifests.Namespace, metav1.GetOptions{})
	if err == nil && ns.DeletionTimestamp != nil {
		fmt.Fprintf(o.Out, "namespace/%s terminating\n", manifests.Namespace)
		return nil
	}
	err = o.Clients.Kube.CoreV1().Namespaces().Delete(ctx, manifests.Namespace, metav1.DeleteOptions{})
	switch {
	case err == nil:
		fmt.Fprintf(o.Out, "namespace/%s deleted\n", manifests.Namespace)
	case !apierrors.IsNotFound(err):
		return fmt.Errorf("delete namespace %s: %w", manifests.Namespace, err)
	}
	return nil
}

// waitGone waits for the namespace and the CRD, which finish deleting
// asynchronously, to disappear.
func (o *Options) waitGone(ctx context.Context) error {
	var still string
	err := wait.PollUntilContextCancel(ctx, o.PollInterval, true, func(ctx context.Context) (bool, error) {
		_, err := o.Clients.Kube.CoreV1().Namespaces().Get(ctx, manifests.Namespace, metav1.GetOptions{})
		if err == nil {
			still = "namespace " + manifests.Namespace
			return false, nil
		} else if !apierrors.IsNotFound(err) {
			return false, err
		}
		_, err = o.Clients.Dynamic.Resource(kube.CRDGVR).Get(ctx, manifests.CRDName, metav1.GetOptions{})
		if err == nil {
			still = "CRD " + manifests.CRDName
			return false, nil
		}
		return apierrors.IsNotFound(err), ignoreNotFound(err)
	})
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && still != "" {
			return fmt.Errorf("timed out: %s is still being deleted", still)
		}
		return fmt.Errorf("wait for deletion: %w", err)
	}
	return nil
}

func ref(kind, group string) string {
	r := strings.ToLower(kind)
	if group != "" {
		r += "." + group
	}
	return r
}

func orElse(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func ignoreNotFound(err error) error {
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}
