package kube

import (
	"context"
	"errors"
	"fmt"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/utils/ptr"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

// The l7 feature's Envoy DaemonSet exists only while l7 is enabled:
// `enable l7` applies it (RenderEnvoy) before switching the feature on,
// `disable l7` deletes it (DeleteEnvoy) after switching it off, install
// does either to match the config it writes, uninstall deletes it with
// everything else.

// AgentImage is the image of the agent container in ds.
func AgentImage(ds *appsv1.DaemonSet) string {
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name == manifests.AgentContainer {
			return c.Image
		}
	}
	if len(ds.Spec.Template.Spec.Containers) > 0 {
		return ds.Spec.Template.Spec.Containers[0].Image
	}
	return ""
}

// ErrNoAgentDaemonSet is returned when the agent DaemonSet, which records
// the images the Envoy DaemonSet runs, does not exist.
var ErrNoAgentDaemonSet = errors.New(`kubectl-ebpf is not installed (no DaemonSet ` + manifests.Namespace + "/" + manifests.DaemonSetName + `): run "kubectl ebpf install"`)

// RenderEnvoy renders the Envoy DaemonSet as the last install would have
// with l7 on: the installed agent's image (the bootstrap init container)
// and version, and the Envoy image the install recorded on the agent
// DaemonSet (manifests.AnnotationEnvoyImage). warning is set when there is
// no record (an install by an older plugin) and the default image is used.
func (c *Clients) RenderEnvoy(ctx context.Context) (obj *unstructured.Unstructured, warning string, err error) {
	ds, err := c.Kube.AppsV1().DaemonSets(manifests.Namespace).Get(ctx, manifests.DaemonSetName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, "", ErrNoAgentDaemonSet
	}
	if err != nil {
		return nil, "", fmt.Errorf("get DaemonSet %s: %w", manifests.DaemonSetName, err)
	}
	image := ds.Annotations[manifests.AnnotationEnvoyImage]
	if image == "" {
		image = manifests.DefaultEnvoyImage
		warning = fmt.Sprintf("the install recorded no Envoy image (annotation %s on DaemonSet %s); using %s: run \"kubectl ebpf install --envoy-image IMAGE\" to choose another",
			manifests.AnnotationEnvoyImage, manifests.DaemonSetName, image)
	}
	obj, err = manifests.EnvoyDaemonSet(manifests.RenderOptions{Image: AgentImage(ds), Version: ds.Labels[manifests.LabelVersion], EnvoyImage: image})
	if err != nil {
		return nil, "", fmt.Errorf("DaemonSet %s (annotation %s): %w", manifests.DaemonSetName, manifests.AnnotationEnvoyImage, err)
	}
	return obj, warning, nil
}

// DeleteEnvoy deletes the Envoy DaemonSet and reports whether there was
// one. Its pods drain on the way out (their preStop hook).
func (c *Clients) DeleteEnvoy(ctx context.Context, dryRun bool) (bool, error) {
	opts := metav1.DeleteOptions{PropagationPolicy: ptr.To(metav1.DeletePropagationBackground)}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	err := c.Kube.AppsV1().DaemonSets(manifests.Namespace).Delete(ctx, manifests.EnvoyDaemonSetName, opts)
	switch {
	case apierrors.IsNotFound(err):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("delete DaemonSet %s: %w", manifests.EnvoyDaemonSetName, err)
	}
	return true, nil
}
