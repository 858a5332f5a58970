package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	ebpfclient "github.com/kubectl-ebpf/kubectl-ebpf/api/client/versioned"
	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

// agentUser is the agent's ServiceAccount as the API server names it.
const agentUser = "system:serviceaccount:" + manifests.Namespace + ":" + manifests.DaemonSetName

// nodeNameClaim is the user extra the API server derives from a pod-bound
// token's kubernetes.io.node.name claim.
const nodeNameClaim = "authentication.kubernetes.io/node-name"

// rbacRow is one access question: may user do verb on resource (name) in
// namespace ("" cluster-wide)?
type rbacRow struct {
	verb, resource, sub, ns, name string
	agent, jane                   bool
}

func (r rbacRow) String() string {
	s := r.verb + " " + r.resource
	if r.sub != "" {
		s += "/" + r.sub
	}
	if r.name != "" {
		s += " " + r.name
	}
	if r.ns != "" {
		s += " -n " + r.ns
	}
	return s
}

// rbacMatrix is what the agent's ServiceAccount and a plain user (no
// binding at all) may do; README's RBAC table is this table.
func rbacMatrix() []rbacRow {
	ns := manifests.Namespace
	return []rbacRow{
		{verb: "list", resource: "pods", agent: true},
		{verb: "watch", resource: "pods", agent: true},
		{verb: "get", resource: "pods", ns: "default"},
		{verb: "create", resource: "pods", ns: ns},
		{verb: "list", resource: "services", agent: true},
		{verb: "get", resource: "nodes", name: "any", agent: true},
		{verb: "list", resource: "nodes", agent: true},
		{verb: "patch", resource: "nodes", name: "any"},
		{verb: "get", resource: "namespaces", name: ns, agent: true},
		{verb: "delete", resource: "namespaces", name: ns},
		{verb: "list", resource: "endpointslices.discovery.k8s.io", agent: true},
		{verb: "list", resource: "networkpolicies.networking.k8s.io", agent: true},
		{verb: "create", resource: "networkpolicies.networking.k8s.io", ns: "default"},
		{verb: "list", resource: "secrets", ns: ns},
		{verb: "get", resource: "secrets", ns: "kube-system", name: "any"},
		{verb: "create", resource: "serviceaccounts", sub: "token", ns: ns, name: manifests.DaemonSetName},
		{verb: "create", resource: "nodestates.kubectl-ebpf.io", agent: true},
		{verb: "patch", resource: "nodestates.kubectl-ebpf.io", name: "any", agent: true},
		{verb: "update", resource: "nodestates.kubectl-ebpf.io", name: "any"},
		{verb: "delete", resource: "nodestates.kubectl-ebpf.io", name: "any"},
		{verb: "get", resource: "nodestates.kubectl-ebpf.io", name: "any"},
		{verb: "list", resource: "nodestates.kubectl-ebpf.io"},
		{verb: "list", resource: "l7policies.kubectl-ebpf.io", agent: true},
		{verb: "get", resource: "l7policies.kubectl-ebpf.io", ns: "default", name: "any", agent: true},
		{verb: "update", resource: "l7policies.kubectl-ebpf.io", ns: "default", name: "any"},
		{verb: "update", resource: "l7policies.kubectl-ebpf.io", sub: "status", ns: "default", name: "any", agent: true},
		{verb: "patch", resource: "l7policies.kubectl-ebpf.io", sub: "status", ns: "default", name: "any"},
		{verb: "create", resource: "events", ns: "default", agent: true},
		{verb: "patch", resource: "events", ns: "default", name: "any", agent: true},
		{verb: "list", resource: "configmaps", ns: ns, name: manifests.ConfigMapName, agent: true},
		{verb: "watch", resource: "configmaps", ns: ns, name: manifests.ConfigMapName, agent: true},
		{verb: "get", resource: "configmaps", ns: ns, name: manifests.ConfigMapName},
		{verb: "update", resource: "configmaps", ns: ns, name: manifests.ConfigMapName},
		{verb: "list", resource: "configmaps", ns: ns},
		{verb: "list", resource: "configmaps", ns: "kube-system", name: manifests.ConfigMapName},
		{verb: "get", resource: "daemonsets.apps", ns: ns, name: manifests.DaemonSetName, agent: true},
		{verb: "get", resource: "daemonsets.apps", ns: ns, name: manifests.EnvoyDaemonSetName},
		{verb: "patch", resource: "daemonsets.apps", ns: ns, name: manifests.DaemonSetName},
		{verb: "delete", resource: "validatingadmissionpolicies.admissionregistration.k8s.io", name: "kubectl-ebpf-agent-own-nodestate"},
		{verb: "delete", resource: "validatingadmissionpolicybindings.admissionregistration.k8s.io", name: "kubectl-ebpf-agent-own-nodestate"},
		{verb: "escalate", resource: "clusterroles.rbac.authorization.k8s.io", name: "kubectl-ebpf:agent"},
	}
}

// canI asks the API server, as user, through kubectl auth can-i (a
// SubjectAccessReview by impersonation).
func canI(t *testing.T, user string, r rbacRow) bool {
	t.Helper()
	args := []string{"auth", "can-i", r.verb, r.resource, "--as", user}
	if r.name != "" {
		args[3] += "/" + r.name
	}
	if r.sub != "" {
		args = append(args, "--subresource", r.sub)
	}
	if r.ns != "" {
		args = append(args, "-n", r.ns)
	} else {
		args = append(args, "--all-namespaces")
	}
	res := runKubectl(t, time.Minute, false, args...)
	switch out := strings.TrimSpace(res.stdout); {
	case res.code == 0 && out == "yes":
		return true
	case res.code == 1 && strings.HasPrefix(out, "no"):
		return false
	default:
		t.Fatalf("kubectl %s: exit %d: %s%s", strings.Join(args, " "), res.code, res.stdout, res.stderr)
		return false
	}
}

// restConfig is the cluster's admin config; asToken turns it into one
// that authenticates with token alone (no client certificate, which the
// API server would otherwise prefer).
func restConfig(t *testing.T) *rest.Config {
	t.Helper()
	c, err := clientcmd.BuildConfigFromFlags("", env.Cluster.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func asToken(t *testing.T, token string) (*kubernetes.Clientset, *ebpfclient.Clientset) {
	t.Helper()
	c := rest.AnonymousClientConfig(restConfig(t))
	c.BearerToken = token
	kc, err := kubernetes.NewForConfig(c)
	if err != nil {
		t.Fatal(err)
	}
	ec, err := ebpfclient.NewForConfig(c)
	if err != nil {
		t.Fatal(err)
	}
	return kc, ec
}

// jwtClaims decodes a token's payload (no verification: the API server
// does that when the token is used).
func jwtClaims(t *testing.T, token string) map[string]any {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("token is not a JWT (%d parts)", len(parts))
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var claims map[string]any
	if err := json.Unmarshal(b, &claims); err != nil {
		t.Fatal(err)
	}
	return claims
}

// whoami is the user the API server makes of token (SelfSubjectReview).
func whoami(t *testing.T, token string) (string, map[string][]string) {
	t.Helper()
	kc, _ := asToken(t, token)
	r, err := kc.AuthenticationV1().SelfSubjectReviews().Create(context.Background(), &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("SelfSubjectReview: %v", err)
	}
	extra := map[string][]string{}
	for k, v := range r.Status.UserInfo.Extra {
		extra[k] = v
	}
	return r.Status.UserInfo.Username, extra
}

// TestIntegrationRBAC is issue 12's least-privilege proof for the API
// side: the agent's RBAC matrix (and a plain user's) answered by the API
// server, and the admission policy holding an agent to its own node's
// NodeState, tried with real requests under a token bound to an agent pod;
// the agents meanwhile run Ready with every feature on and keep writing
// their NodeStates.
func TestIntegrationRBAC(t *testing.T) {
	requireEnv(t)
	if len(env.Cluster.Nodes) < 2 {
		t.Fatalf("needs two nodes; cluster %s has %v", env.Name, env.Cluster.Nodes)
	}
	t.Cleanup(func() { ensureUninstalled(t) })
	mustKubectl(t, 6*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m")
	// l7 too, so its informers and status writes run under the same RBAC.
	mustKubectl(t, 4*time.Minute, "ebpf", "enable", "l7", "--wait")
	mustKubectl(t, 6*time.Minute, "ebpf", "status", "--wait", "--timeout", "5m")
	a, b := nodeAt(0), nodeAt(1)

	t.Run("agents ready and writing their NodeStates", func(t *testing.T) {
		mustKubectl(t, 3*time.Minute, "-n", manifests.Namespace, "wait", "--for=condition=Ready", "pod", "-l", manifests.AgentSelector, "--timeout=150s")
		s, r := status(t)
		if r.code != 0 || len(s.Nodes) != len(env.Cluster.Nodes) {
			t.Fatalf("status: exit %d, %d nodes (cluster has %d)", r.code, len(s.Nodes), len(env.Cluster.Nodes))
		}
		for _, n := range s.Nodes {
			if !n.Ready || len(n.Active) != 4 || len(n.Errors) > 0 {
				t.Errorf("node %s: ready %v active %v errors %v", n.Name, n.Ready, n.Active, n.Errors)
			}
		}
		// A NodeState the agent writes now, with the admission policy in
		// force, proves its kubelet-projected token carries its node.
		mustKubectl(t, time.Minute, "delete", "nodestate", a)
		deadline := time.Now().Add(2 * time.Minute)
		for kubectlQuiet(t, time.Minute, "get", "nodestate", a).code != 0 {
			if time.Now().After(deadline) {
				kubectl(t, time.Minute, "-n", manifests.Namespace, "logs", "-l", manifests.AgentSelector, "-c", manifests.AgentContainer, "--tail=30", "--prefix")
				t.Fatalf("agent on %s did not write its NodeState again within 2m", a)
			}
			time.Sleep(time.Second)
		}
		out := mustKubectl(t, time.Minute, "get", "nodestate", a, "-o", "jsonpath={.metadata.managedFields[*].manager}")
		if !strings.Contains(out, "kebpf-agent") {
			t.Errorf("NodeState %s managers %q, want kebpf-agent", a, out)
		}
	})

	t.Run("matrix", func(t *testing.T) {
		var w strings.Builder
		tw := tabwriter.NewWriter(&w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "request\tagent SA\tjane\t")
		yn := map[bool]string{true: "yes", false: "no"}
		for _, r := range rbacMatrix() {
			ag, jn := canI(t, agentUser, r), canI(t, "jane", r)
			mark := ""
			if ag != r.agent || jn != r.jane {
				mark = "  <-- want agent " + yn[r.agent] + ", jane " + yn[r.jane]
				t.Errorf("%s: agent %s, jane %s; want %s, %s", r, yn[ag], yn[jn], yn[r.agent], yn[r.jane])
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r, yn[ag], yn[jn], mark)
		}
		tw.Flush()
		t.Logf("RBAC matrix (kubectl auth can-i --as):\n%s", w.String())
	})

	agentPod := func(node string) string {
		return strings.TrimSpace(mustKubectl(t, time.Minute, "-n", manifests.Namespace, "get", "pods", "-l", manifests.AgentSelector,
			"--field-selector", "spec.nodeName="+node, "-o", "jsonpath={.items[0].metadata.name}"))
	}
	podA := agentPod(a)
	// Minted without logging: a token is a credential.
	mint := func(args ...string) string {
		args = append([]string{"-n", manifests.Namespace, "create", "token", manifests.DaemonSetName, "--duration", "10m"}, args...)
		r := runKubectl(t, time.Minute, false, args...)
		if r.code != 0 {
			t.Fatalf("kubectl %s: exit %d: %s", strings.Join(args, " "), r.code, r.stderr)
		}
		return strings.TrimSpace(r.stdout)
	}
	token := mint("--bound-object-kind", "Pod", "--bound-object-name", podA)
	unbound := mint()

	t.Run("pod-bound token carries the node", func(t *testing.T) {
		k8s, _ := jwtClaims(t, token)["kubernetes.io"].(map[string]any)
		node, _ := k8s["node"].(map[string]any)
		pod, _ := k8s["pod"].(map[string]any)
		if node["name"] != a || pod["name"] != podA {
			t.Errorf("token claims kubernetes.io = %v, want node %s, pod %s", k8s, a, podA)
		}
		user, extra := whoami(t, token)
		t.Logf("pod-bound token: user %s, extra %v", user, extra)
		if user != agentUser || len(extra[nodeNameClaim]) != 1 || extra[nodeNameClaim][0] != a {
			t.Errorf("pod-bound token: user %q, %s %v; want %s, [%s]", user, nodeNameClaim, extra[nodeNameClaim], agentUser, a)
		}
		user, extra = whoami(t, unbound)
		if user != agentUser || len(extra[nodeNameClaim]) != 0 {
			t.Errorf("unbound token: user %q, %s %v; want %s without the claim", user, nodeNameClaim, extra[nodeNameClaim], agentUser)
		}
	})

	t.Run("admission holds the agent to its own NodeState", func(t *testing.T) {
		ctx := context.Background()
		_, ec := asToken(t, token)
		_, ecUnbound := asToken(t, unbound)
		ns := ec.EbpfV1alpha1().NodeStates()
		label := func(v string) []byte {
			return fmt.Appendf(nil, `{"metadata":{"labels":{"kubectl-ebpf.io/rbac-test":%q}}}`, v)
		}
		t.Cleanup(func() {
			kubectlQuiet(t, time.Minute, "label", "nodestate", a, b, "kubectl-ebpf.io/rbac-test-")
			kubectlQuiet(t, time.Minute, "delete", "nodestate", "not-a-node", "--ignore-not-found")
		})
		denied := func(what string, err error, want string) {
			t.Helper()
			switch {
			case err == nil:
				t.Errorf("%s: allowed, want denied", what)
			case !apierrors.IsForbidden(err) && !apierrors.IsInvalid(err):
				t.Errorf("%s: %v, want Forbidden", what, err)
			case !strings.Contains(err.Error(), want):
				t.Errorf("%s: %v, want a denial saying %q", what, err, want)
			default:
				t.Logf("%s: denied: %v", what, err)
			}
		}
		_, err := ns.Patch(ctx, b, types.MergePatchType, label("b"), metav1.PatchOptions{})
		denied("patch NodeState "+b+" with "+a+"'s token", err, "ValidatingAdmissionPolicy 'kubectl-ebpf-agent-own-nodestate'")
		denied("patch NodeState "+b+" with "+a+"'s token", err, "the kebpf-agent on node "+a+" may write only NodeState "+a+", not "+b)

		// A valid object (node A's status), so only admission can refuse it.
		admin, err := ebpfclient.NewForConfig(restConfig(t))
		if err != nil {
			t.Fatal(err)
		}
		cur, err := admin.EbpfV1alpha1().NodeStates().Get(ctx, a, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		fake := &apiv1.NodeState{ObjectMeta: metav1.ObjectMeta{Name: "not-a-node"}, Status: cur.Status}
		_, err = ns.Create(ctx, fake, metav1.CreateOptions{})
		denied("create NodeState not-a-node with "+a+"'s token", err, "not not-a-node")

		_, err = ecUnbound.EbpfV1alpha1().NodeStates().Patch(ctx, a, types.MergePatchType, label("unbound"), metav1.PatchOptions{})
		denied("patch NodeState "+a+" with a token bound to no pod", err, "no authentication.kubernetes.io/node-name claim")

		err = ns.Delete(ctx, a, metav1.DeleteOptions{})
		denied("delete NodeState "+a+" with "+a+"'s token", err, "cannot delete resource")

		if _, err := ns.Patch(ctx, a, types.MergePatchType, label("a"), metav1.PatchOptions{}); err != nil {
			t.Errorf("patch NodeState %s with its own agent's token: %v", a, err)
		} else {
			t.Logf("patch NodeState %s with %s's token: allowed", a, a)
		}
		if got := mustKubectl(t, time.Minute, "get", "nodestate", b, "-o", "jsonpath={.metadata.labels.kubectl-ebpf\\.io/rbac-test}"); got != "" {
			t.Errorf("NodeState %s got the label %q through a denied request", b, got)
		}
	})

	t.Run("the config by name only", func(t *testing.T) {
		ctx := context.Background()
		kc, _ := asToken(t, token)
		cms := kc.CoreV1().ConfigMaps(manifests.Namespace)
		byName := metav1.ListOptions{FieldSelector: "metadata.name=" + manifests.ConfigMapName}
		if l, err := cms.List(ctx, byName); err != nil || len(l.Items) != 1 {
			t.Errorf("list configmaps %s as the agent: %v", byName.FieldSelector, err)
		}
		w, err := cms.Watch(ctx, byName)
		if err != nil {
			t.Errorf("watch configmaps %s as the agent: %v", byName.FieldSelector, err)
		} else {
			w.Stop()
		}
		if _, err := cms.List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("list all configmaps of %s as the agent: %v, want Forbidden", manifests.Namespace, err)
		}
		if _, err := cms.Get(ctx, manifests.ConfigMapName, metav1.GetOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("get configmap %s as the agent: %v, want Forbidden (the agent lists and watches it)", manifests.ConfigMapName, err)
		}
	})

	// Still writing after all of the above: the heartbeat re-applies.
	t.Run("NodeStates still written", func(t *testing.T) {
		rv := func(n string) string {
			return kubectlQuiet(t, time.Minute, "get", "nodestate", n, "-o", "jsonpath={.metadata.resourceVersion}").stdout
		}
		before := map[string]string{a: rv(a), b: rv(b)}
		deadline := time.Now().Add(90 * time.Second)
		for _, n := range []string{a, b} {
			for rv(n) == before[n] {
				if time.Now().After(deadline) {
					t.Fatalf("NodeState %s not re-applied within 90s (heartbeat 30s)", n)
				}
				time.Sleep(2 * time.Second)
			}
		}
	})
}
