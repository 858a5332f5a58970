package install

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
)

// ImageCheckName labels the pods of the image check (app.kubernetes.io/name);
// they carry the managed labels too, so uninstall removes any left behind.
const ImageCheckName = "kebpf-image-check"

// checkedImage is one image the check runs on every node, with a command
// that proves the image runs there, not only that it pulls.
type checkedImage struct {
	container, image string
	command          []string
}

// imagesToCheck lists the images this install would roll out that the
// cluster does not run already: the agent's (its DaemonSet rolls node by
// node, and a node whose agent was replaced by one that cannot start
// refuses new pods: kebpf-cni fails closed), and Envoy's when l7 is on.
func (o *Options) imagesToCheck(ctx context.Context) ([]checkedImage, error) {
	var out []checkedImage
	apps := o.Clients.Kube.AppsV1().DaemonSets(manifests.Namespace)
	ds, err := apps.Get(ctx, manifests.DaemonSetName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return nil, fmt.Errorf("get DaemonSet %s: %w", manifests.DaemonSetName, err)
	}
	if err != nil || kube.AgentImage(ds) != o.Image {
		out = append(out, checkedImage{"agent", o.Image, []string{"/usr/local/bin/kebpf-agent", "version"}})
	}
	if o.rendersEnvoy() {
		envoy, err := apps.Get(ctx, manifests.EnvoyDaemonSetName, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
		case err != nil:
			return nil, fmt.Errorf("get DaemonSet %s: %w", manifests.EnvoyDaemonSetName, err)
		}
		if err != nil || !runsImage(envoy.Spec.Template.Spec.Containers, o.EnvoyImage) {
			out = append(out, checkedImage{"envoy", o.EnvoyImage, []string{"/usr/local/bin/envoy", "--version"}})
		}
	}
	return out, nil
}

func runsImage(cs []corev1.Container, image string) bool {
	return slices.ContainsFunc(cs, func(c corev1.Container) bool { return c.Image == image })
}

// checkImages runs images on every ready node before anything is rolled
// out, and fails naming each node where one cannot be pulled or does not
// run: the install then changes nothing, so a typo'd --image never leaves a
// node without a working agent.
func (o *Options) checkImages(ctx context.Context, images []checkedImage) error {
	ready, notReady, err := o.Clients.ReadyNodes(ctx)
	if err != nil {
		return err
	}
	for _, n := range notReady {
		fmt.Fprintf(o.ErrOut, "warning: node %s is not ready: the image check skips it\n", n)
	}
	if len(ready) == 0 {
		return nil
	}
	var names []string
	for _, im := range images {
		names = append(names, im.image)
	}
	fmt.Fprintf(o.Out, "checking that %s run(s) on %d node(s)\n", strings.Join(names, " and "), len(ready))
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	sel := manifests.LabelName + "=" + ImageCheckName
	failures := map[string]string{} // node -> why
	err = o.Clients.RunOnNodes(ctx, manifests.Namespace, sel, ready,
		func(node string) *corev1.Pod { return ImageCheckPod(node, images) }, o.PollInterval,
		func(r kube.PodRun) {
			switch {
			case r.Failed:
				failures[r.Node] = "an image's check command failed: " + o.failedContainers(ctx, r.Pod)
			case r.Stuck != "":
				failures[r.Node] = r.Stuck
			}
		})
	var pending *kube.PendingError
	if errors.As(err, &pending) {
		return fmt.Errorf("image check: not done on node(s) %s after %s (a slow pull? raise --timeout, or pass --skip-image-check); nothing was changed",
			strings.Join(pending.Nodes, ", "), o.Timeout)
	}
	if err != nil {
		return fmt.Errorf("image check: %w", err)
	}
	if len(failures) > 0 {
		var lines []string
		for _, node := range slices.Sorted(maps.Keys(failures)) {
			lines = append(lines, "node "+node+": "+failures[node])
		}
		return fmt.Errorf("image check failed, nothing was changed: %s; fix --image/--envoy-image (or pass --skip-image-check to roll out anyway)",
			strings.Join(lines, "; "))
	}
	return nil
}

// failedContainers names the check's containers that exited non-zero,
// with their exit code.
func (o *Options) failedContainers(ctx context.Context, pod string) string {
	p, err := o.Clients.Kube.CoreV1().Pods(manifests.Namespace).Get(ctx, pod, metav1.GetOptions{})
	if err != nil {
		return "(pod gone: " + err.Error() + ")"
	}
	var out []string
	for _, cs := range p.Status.ContainerStatuses {
		if t := cs.State.Terminated; t != nil && t.ExitCode != 0 {
			out = append(out, fmt.Sprintf("%s (%s) exited %d %s", cs.Name, cs.Image, t.ExitCode, t.Reason))
		}
	}
	return strings.Join(out, ", ")
}

// ImageCheckPod runs each image's check command on node. Host network, so
// it needs no CNI: a node whose kebpf-cni refuses sandboxes (its agent is
// down) is checked too. It needs no privilege and no API access.
func ImageCheckPod(node string, images []checkedImage) *corev1.Pod {
	p := kube.NodePod(ImageCheckName, node, 0)
	for _, im := range images {
		p.Spec.Containers = append(p.Spec.Containers, corev1.Container{
			Name:            im.container,
			Image:           im.image,
			ImagePullPolicy: corev1.PullIfNotPresent, // as the DaemonSets pull
			Command:         im.command,
			SecurityContext: &corev1.SecurityContext{
				Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
				AllowPrivilegeEscalation: ptr.To(false),
				ReadOnlyRootFilesystem:   ptr.To(true),
			},
		})
	}
	return p
}
