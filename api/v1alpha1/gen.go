package v1alpha1

// Deepcopy and the CRD YAML the plugin installs are generated from the types'
// kubebuilder markers; `make generate` runs these and `make verify` fails when
// the committed files differ. The CRDs land in manifests/yaml under the name
// that gives them their apply order (after the namespace, before RBAC).
//go:generate go tool controller-gen object paths=.
//go:generate sh -c "go tool controller-gen crd:crdVersions=v1 paths=. output:crd:stdout > ../../manifests/yaml/10-crds.yaml"
