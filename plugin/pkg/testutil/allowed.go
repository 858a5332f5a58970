package testutil

import (
	authv1 "k8s.io/api/authorization/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

func setAllowed(obj runtime.Object, allowed bool) {
	if r, ok := obj.(*authv1.SelfSubjectAccessReview); ok {
		r.Status.Allowed = allowed
	}
}
