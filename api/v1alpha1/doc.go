// Package v1alpha1 holds kubectl-ebpf's API: the custom resources the agents
// write and the plugin reads, and the agent config the plugin writes into the
// ConfigMap. It imports nothing of ours, so the plugin, the agents and the xDS
// server can share it without reaching into each other's trees.
//
// Typed access goes through the clientset client-gen generates from the
// +genclient markers into api/client/versioned (with a fake for unit tests),
// not through controller-runtime: the plugin and the agent already build on
// client-go, and a generated clientset adds no new heavy dependency.
//
// +kubebuilder:object:generate=true
// +groupName=kubectl-ebpf.io
// +groupGoName=Ebpf
package v1alpha1

// Deepcopy and the CRD YAML the plugin installs are generated from the types'
// kubebuilder markers; `make generate` runs these and `make verify` fails when
// the committed files differ. The CRDs land in manifests/yaml under the name
// that gives them their apply order (after the namespace, before RBAC).
//go:generate go tool controller-gen object paths=.
//go:generate sh -c "go tool controller-gen crd:crdVersions=v1 paths=. output:crd:stdout > ../../manifests/yaml/10-crds.yaml"
//
// The clientset: --output-dir/--output-pkg make the output independent of
// GOPATH; the old tree is removed first so a type that goes away leaves no
// stale files behind.
//go:generate sh -c "rm -rf ../client && go tool client-gen --go-header-file ../boilerplate.go.txt --clientset-name versioned --input-base github.com/kubectl-ebpf/kubectl-ebpf --input api/v1alpha1 --output-dir ../client --output-pkg github.com/kubectl-ebpf/kubectl-ebpf/api/client"
