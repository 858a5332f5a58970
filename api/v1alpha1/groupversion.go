package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

const (
	// Group is the API group of our CRDs.
	Group = "kubectl-ebpf.io"
	// Version is the served version.
	Version = "v1alpha1"
)

// SchemeGroupVersion is group/version of every type in this package.
var SchemeGroupVersion = schema.GroupVersion{Group: Group, Version: Version}

var (
	// SchemeBuilder registers this package's types.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)
	// AddToScheme adds this package's types to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(SchemeGroupVersion, &NodeState{}, &NodeStateList{}, &L7Policy{}, &L7PolicyList{})
	metav1.AddToGroupVersion(s, SchemeGroupVersion)
	return nil
}
