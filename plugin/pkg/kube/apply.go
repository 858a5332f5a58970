package kube

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

// CRDGVR addresses CustomResourceDefinitions.
var CRDGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// Resource maps obj's kind to a dynamic client for its resource.
func (c *Clients) Resource(gvk schema.GroupVersionKind, namespace string) (dynamic.ResourceInterface, *meta.RESTMapping, error) {
	m, err := c.Mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if meta.IsNoMatchError(err) {
		// The discovery cache may predate a CRD we just created.
		if r, ok := c.Mapper.(meta.ResettableRESTMapper); ok {
			r.Reset()
			m, err = c.Mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		}
	}
	if err != nil {
		return nil, nil, fmt.Errorf("map %s: %w", gvk.Kind, err)
	}
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		return c.Dynamic.Resource(m.Resource).Namespace(namespace), m, nil
	}
	return c.Dynamic.Resource(m.Resource), m, nil
}

// Apply outcomes.
const (
	Created    = "created"
	Configured = "configured"
	Unchanged  = "unchanged"
)

// Apply server-side applies obj under our field manager, forcing ownership so
// an upgrade wins over edits made with kubectl. It reports whether the object
// was created, changed or left as it was (same resourceVersion).
func (c *Clients) Apply(ctx context.Context, obj *unstructured.Unstructured, dryRun bool) (*unstructured.Unstructured, string, error) {
	ri, _, err := c.Resource(obj.GroupVersionKind(), obj.GetNamespace())
	if err != nil {
		return nil, "", err
	}
	before, err := ri.Get(ctx, obj.GetName(), metav1.GetOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return nil, "", fmt.Errorf("get %s %s: %w", obj.GetKind(), obj.GetName(), err)
	}
	opts := metav1.ApplyOptions{FieldManager: manifests.FieldManager, Force: true}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	after, err := ri.Apply(ctx, obj.GetName(), obj, opts)
	if err != nil {
		return nil, "", fmt.Errorf("apply %s %s: %w", obj.GetKind(), obj.GetName(), err)
	}
	action := Configured
	switch {
	case before == nil:
		action = Created
	case SameApply(before, after):
		action = Unchanged
	}
	slog.Debug("applied", "kind", obj.GetKind(), "name", obj.GetName(), "action", action, "dryRun", dryRun, "resourceVersion", after.GetResourceVersion())
	return after, action, nil
}

// SameApply reports whether after carries the same configuration as before:
// equal resourceVersions, or equal objects once what the server and
// controllers write on their own is set aside (resourceVersion, managedFields,
// status). Comparing managedFields themselves is not enough: a controller's
// status write and a no-op apply of ours racing can make the API server
// rewrite our managedFields entry (a new timestamp, entries reordered)
// although nothing we apply changed (seen with the ValidatingAdmissionPolicy
// whose status kube-controller-manager writes right after its creation).
func SameApply(before, after *unstructured.Unstructured) bool {
	if before.GetResourceVersion() == after.GetResourceVersion() {
		return true
	}
	return equality.Semantic.DeepEqual(configOf(before), configOf(after))
}

// configOf is obj without the fields nobody applies.
func configOf(obj *unstructured.Unstructured) map[string]any {
	c := obj.DeepCopy()
	c.SetResourceVersion("")
	c.SetManagedFields(nil)
	delete(c.Object, "status")
	return c.Object
}

// WaitCRDEstablished waits until the API server serves the CRD named name.
func (c *Clients) WaitCRDEstablished(ctx context.Context, name string, timeout time.Duration) error {
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		crd, err := c.Dynamic.Resource(CRDGVR).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			if apierrors.IsNotFound(err) {
				return false, nil
			}
			return false, err
		}
		conds, _, _ := unstructured.NestedSlice(crd.Object, "status", "conditions")
		for _, c := range conds {
			m, _ := c.(map[string]any)
			if m["type"] == "Established" && m["status"] == "True" {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("wait for CRD %s to be established: %w", name, err)
	}
	return nil
}
