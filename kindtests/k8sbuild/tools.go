//go:build tools

// Package k8sbuild pins the Kubernetes release whose binaries the Docker-free
// local cluster runs. It is a separate module because k8s.io/kubernetes can only
// be built with every k8s.io staging module replaced by its published version,
// and those replaces must not leak into the product's own module.
package k8sbuild

import (
	_ "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	_ "k8s.io/kubernetes/cmd/kube-proxy/app"
	_ "k8s.io/kubernetes/cmd/kube-scheduler/app"
	_ "k8s.io/kubernetes/cmd/kubelet/app"
)
