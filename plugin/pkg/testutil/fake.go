package testutil

import (
	"encoding/json"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	clienttesting "k8s.io/client-go/testing"

	ebpffake "github.com/kubectl-ebpf/kubectl-ebpf/api/client/versioned/fake"
	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
)

// Fake is a fake cluster for unit tests: the Kubernetes, kubectl-ebpf
// (NodeState) and dynamic clients over separate trackers, and a REST mapper
// knowing the kinds install uses.
type Fake struct {
	Clients *kube.Clients
	Kube    *fake.Clientset
	EBPF    *ebpffake.Clientset
	Dynamic *dynamicfake.FakeDynamicClient
}

// NewFake builds a fake cluster holding kubeObjs (Kubernetes types) and
// objs: NodeStates go to the kubectl-ebpf clientset, anything else
// (unstructured CRDs) to the dynamic client. Every access review is allowed
// unless the test installs its own reactor.
func NewFake(t *testing.T, kubeObjs []runtime.Object, objs ...runtime.Object) *Fake {
	t.Helper()
	var states, dynObjs []runtime.Object
	for _, o := range objs {
		if _, ok := o.(*apiv1.NodeState); ok {
			states = append(states, o)
		} else {
			dynObjs = append(dynObjs, o)
		}
	}
	ec := ebpffake.NewSimpleClientset(states...)
	kc := fake.NewClientset(kubeObjs...)
	// The fake tracker does not implement generateName.
	var n atomic.Int64
	kc.PrependReactor("create", "*", func(a clienttesting.Action) (bool, runtime.Object, error) {
		obj := a.(clienttesting.CreateAction).GetObject()
		m, err := meta.Accessor(obj)
		if err == nil && m.GetName() == "" && m.GetGenerateName() != "" {
			m.SetName(fmt.Sprintf("%s%d", m.GetGenerateName(), n.Add(1)))
		}
		return false, nil, nil
	})
	AllowAll(kc)
	listKinds := map[schema.GroupVersionResource]string{
		kube.CRDGVR:                                                                                           "CustomResourceDefinitionList",
		{Version: "v1", Resource: "namespaces"}:                                                               "NamespaceList",
		{Version: "v1", Resource: "serviceaccounts"}:                                                          "ServiceAccountList",
		{Version: "v1", Resource: "configmaps"}:                                                               "ConfigMapList",
		{Group: "apps", Version: "v1", Resource: "daemonsets"}:                                                "DaemonSetList",
		{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterroles"}:                         "ClusterRoleList",
		{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterrolebindings"}:                  "ClusterRoleBindingList",
		{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "roles"}:                                "RoleList",
		{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "rolebindings"}:                         "RoleBindingList",
		{Group: "admissionregistration.k8s.io", Version: "v1", Resource: "validatingadmissionpolicies"}:       "ValidatingAdmissionPolicyList",
		{Group: "admissionregistration.k8s.io", Version: "v1", Resource: "validatingadmissionpolicybindings"}: "ValidatingAdmissionPolicyBindingList",
	}
	dc := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), listKinds, dynObjs...)
	mapper := meta.NewDefaultRESTMapper(nil)
	for _, k := range []struct {
		gvk   schema.GroupVersionKind
		scope meta.RESTScope
	}{
		{schema.GroupVersionKind{Version: "v1", Kind: "Namespace"}, meta.RESTScopeRoot},
		{schema.GroupVersionKind{Version: "v1", Kind: "ServiceAccount"}, meta.RESTScopeNamespace},
		{schema.GroupVersionKind{Version: "v1", Kind: "ConfigMap"}, meta.RESTScopeNamespace},
		{schema.GroupVersionKind{Group: "apps", Version: "v1", Kind: "DaemonSet"}, meta.RESTScopeNamespace},
		{schema.GroupVersionKind{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "ClusterRole"}, meta.RESTScopeRoot},
		{schema.GroupVersionKind{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "ClusterRoleBinding"}, meta.RESTScopeRoot},
		{schema.GroupVersionKind{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "Role"}, meta.RESTScopeNamespace},
		{schema.GroupVersionKind{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "RoleBinding"}, meta.RESTScopeNamespace},
		{schema.GroupVersionKind{Group: "admissionregistration.k8s.io", Version: "v1", Kind: "ValidatingAdmissionPolicy"}, meta.RESTScopeRoot},
		{schema.GroupVersionKind{Group: "admissionregistration.k8s.io", Version: "v1", Kind: "ValidatingAdmissionPolicyBinding"}, meta.RESTScopeRoot},
		{schema.GroupVersionKind{Group: "apiextensions.k8s.io", Version: "v1", Kind: "CustomResourceDefinition"}, meta.RESTScopeRoot},
		{apiv1.NodeStateGVK, meta.RESTScopeRoot},
	} {
		mapper.Add(k.gvk, k.scope)
	}
	return &Fake{
		Clients: &kube.Clients{Host: "https://fake.test", Kube: kc, EBPF: ec, Dynamic: dc, Mapper: mapper, Probe: kc.Discovery()},
		Kube:    kc,
		EBPF:    ec,
		Dynamic: dc,
	}
}

// AllowAll answers every SelfSubjectAccessReview with allowed.
func AllowAll(kc *fake.Clientset) {
	kc.PrependReactor("create", "selfsubjectaccessreviews", func(a clienttesting.Action) (bool, runtime.Object, error) {
		obj := a.(clienttesting.CreateAction).GetObject().DeepCopyObject()
		setAllowed(obj, true)
		return true, obj, nil
	})
}

// DenyAll answers every SelfSubjectAccessReview with denied.
func DenyAll(kc *fake.Clientset) {
	kc.PrependReactor("create", "selfsubjectaccessreviews", func(a clienttesting.Action) (bool, runtime.Object, error) {
		obj := a.(clienttesting.CreateAction).GetObject().DeepCopyObject()
		setAllowed(obj, false)
		return true, obj, nil
	})
}

// Mutations lists the create/update/patch/delete actions every client saw.
func (f *Fake) Mutations() []string {
	var out []string
	for _, a := range slices.Concat(f.Kube.Actions(), f.EBPF.Actions(), f.Dynamic.Actions()) {
		switch a.GetVerb() {
		case "create", "update", "patch", "delete", "delete-collection":
			if a.GetResource().Resource == "selfsubjectaccessreviews" {
				continue
			}
			out = append(out, a.GetVerb()+" "+a.GetResource().Resource)
		}
	}
	return out
}

// RecordApplies makes the dynamic client store what is server-side applied
// (the fake has no apply) and returns the applied objects by "Kind/name".
// CRDs are marked established, so install does not wait for them.
func (f *Fake) RecordApplies() map[string]*unstructured.Unstructured {
	got := map[string]*unstructured.Unstructured{}
	f.Dynamic.PrependReactor("patch", "*", func(a clienttesting.Action) (bool, runtime.Object, error) {
		p := a.(clienttesting.PatchAction)
		u := &unstructured.Unstructured{}
		if err := json.Unmarshal(p.GetPatch(), &u.Object); err != nil {
			return true, nil, err
		}
		if u.GetKind() == "CustomResourceDefinition" {
			_ = unstructured.SetNestedSlice(u.Object, []any{map[string]any{"type": "Established", "status": "True"}}, "status", "conditions")
		}
		got[u.GetKind()+"/"+u.GetName()] = u
		tr := f.Dynamic.Tracker()
		if err := tr.Create(a.GetResource(), u, u.GetNamespace()); apierrors.IsAlreadyExists(err) {
			err = tr.Update(a.GetResource(), u, u.GetNamespace())
			return true, u, err
		} else if err != nil {
			return true, nil, err
		}
		return true, u, nil
	})
	return got
}
