package testutil

import (
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

// Objects the plugin's unit tests put into a Fake.

// NodeState is the NodeState an agent on node name reports.
func NodeState(name string, st apiv1.NodeStateStatus) *apiv1.NodeState {
	return &apiv1.NodeState{
		TypeMeta:   metav1.TypeMeta{APIVersion: apiv1.SchemeGroupVersion.String(), Kind: apiv1.NodeStateKind},
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Status:     st,
	}
}

// CRD is the installed NodeState CRD, as the dynamic client sees it.
func CRD() *unstructured.Unstructured {
	u := &unstructured.Unstructured{}
	u.SetAPIVersion("apiextensions.k8s.io/v1")
	u.SetKind("CustomResourceDefinition")
	u.SetName(manifests.CRDName)
	return u
}

// Namespace is kubectl-ebpf's namespace.
func Namespace() *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: manifests.Namespace}}
}

// RunningReady is the status of an agent pod that runs and is ready.
var RunningReady = corev1.PodStatus{Phase: corev1.PodRunning, Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}

// AgentPod is the agent pod name on node nodeName.
func AgentPod(name, nodeName string, status corev1.PodStatus) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: manifests.Namespace, Labels: map[string]string{manifests.LabelName: manifests.DaemonSetName}},
		Spec:       corev1.PodSpec{NodeName: nodeName},
		Status:     status,
	}
}

// DaemonSet is the agent DaemonSet running image (empty: no container
// image), its controller caught up with its spec, with the given counts.
func DaemonSet(image string, desired, ready, updated int32) *appsv1.DaemonSet {
	return &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: manifests.DaemonSetName, Namespace: manifests.Namespace, Generation: 1},
		Spec: appsv1.DaemonSetSpec{Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{
			Containers: []corev1.Container{{Name: manifests.AgentContainer, Image: image}},
		}}},
		Status: appsv1.DaemonSetStatus{ObservedGeneration: 1, DesiredNumberScheduled: desired, NumberReady: ready, UpdatedNumberScheduled: updated},
	}
}
