package manifests

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/google/cel-go/cel"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// agentGrants collects the agent's ClusterRole and Role rules as
// "namespace group/resource[/name]" -> sorted verbs.
func agentGrants(t *testing.T) map[string][]string {
	t.Helper()
	objs, err := Objects(RenderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	grants := map[string][]string{}
	for _, o := range objs {
		if o.GetKind() != "ClusterRole" && o.GetKind() != "Role" {
			continue
		}
		rules, _, _ := unstructured.NestedSlice(o.Object, "rules")
		for _, r := range rules {
			r := r.(map[string]any)
			names := []string{""}
			if rn, ok := r["resourceNames"]; ok {
				names = strs(rn)
			}
			for _, g := range strs(r["apiGroups"]) {
				for _, res := range strs(r["resources"]) {
					for _, n := range names {
						k := fmt.Sprintf("%s %s/%s", o.GetNamespace(), g, res)
						if n != "" {
							k += "/" + n
						}
						grants[k] = append(grants[k], strs(r["verbs"])...)
						slices.Sort(grants[k])
					}
				}
			}
		}
	}
	return grants
}

// TestAgentRBAC pins every grant of the agent to the verbs its client
// calls use (nodeagent); the e2e TestIntegrationRBAC proves the same
// matrix against a real API server.
func TestAgentRBAC(t *testing.T) {
	want := map[string][]string{
		" /pods":                                        {"list", "watch"},
		" /services":                                    {"list", "watch"},
		" /nodes":                                       {"get", "list", "watch"},
		" /namespaces":                                  {"get", "list", "watch"},
		" discovery.k8s.io/endpointslices":              {"list", "watch"},
		" networking.k8s.io/networkpolicies":            {"list", "watch"},
		" kubectl-ebpf.io/nodestates":                   {"create", "patch"},
		" kubectl-ebpf.io/l7policies":                   {"get", "list", "watch"},
		" kubectl-ebpf.io/l7policies/status":            {"update"},
		" /events":                                      {"create", "patch"},
		Namespace + " /configmaps/" + ConfigMapName:     {"list", "watch"},
		Namespace + " apps/daemonsets/" + DaemonSetName: {"get"},
	}
	got := agentGrants(t)
	for _, k := range slices.Sorted(maps.Keys(got)) {
		if !slices.Equal(got[k], want[k]) {
			t.Errorf("agent grant %q: verbs %v, want %v", k, got[k], want[k])
		}
	}
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if _, ok := got[k]; !ok {
			t.Errorf("agent lacks grant %q %v", k, want[k])
		}
	}
}

// TestAgentNodeStatePolicy evaluates the ValidatingAdmissionPolicy's CEL
// (match condition, variables, validations) on the requests it must allow
// and deny; TestIntegrationRBAC sends the real ones.
func TestAgentNodeStatePolicy(t *testing.T) {
	objs, err := Objects(RenderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vap := find(t, objs, "ValidatingAdmissionPolicy")
	binding := find(t, objs, "ValidatingAdmissionPolicyBinding")
	if p, _, _ := unstructured.NestedString(binding.Object, "spec", "policyName"); p != vap.GetName() {
		t.Errorf("binding names policy %q, want %q", p, vap.GetName())
	}
	if a, _, _ := unstructured.NestedStringSlice(binding.Object, "spec", "validationActions"); !slices.Equal(a, []string{"Deny"}) {
		t.Errorf("binding validationActions %v, want [Deny]", a)
	}
	if fp, _, _ := unstructured.NestedString(vap.Object, "spec", "failurePolicy"); fp != "Fail" {
		t.Errorf("failurePolicy %q, want Fail", fp)
	}
	rules, _, _ := unstructured.NestedSlice(vap.Object, "spec", "matchConstraints", "resourceRules")
	if len(rules) != 1 {
		t.Fatalf("resourceRules %v", rules)
	}
	r := rules[0].(map[string]any)
	if !slices.Equal(strs(r["apiGroups"]), []string{"kubectl-ebpf.io"}) || !slices.Contains(strs(r["resources"]), "nodestates") ||
		!slices.Equal(strs(r["operations"]), []string{"CREATE", "UPDATE", "DELETE"}) {
		t.Errorf("resourceRules %v: want kubectl-ebpf.io nodestates CREATE, UPDATE, DELETE", r)
	}

	env, err := cel.NewEnv(cel.Variable("request", cel.DynType), cel.Variable("object", cel.DynType),
		cel.Variable("oldObject", cel.DynType), cel.Variable("variables", cel.MapType(cel.StringType, cel.DynType)))
	if err != nil {
		t.Fatal(err)
	}
	eval := func(expr string, in map[string]any) any {
		t.Helper()
		ast, iss := env.Compile(expr)
		if iss.Err() != nil {
			t.Fatalf("compile %q: %v", expr, iss.Err())
		}
		prg, err := env.Program(ast)
		if err != nil {
			t.Fatal(err)
		}
		out, _, err := prg.Eval(in)
		if err != nil {
			t.Fatalf("eval %q: %v", expr, err)
		}
		return out.Value()
	}
	// decide returns "" when the policy admits the request, else the
	// message of the first failed validation; "skip" when it does not match.
	decide := func(user string, extra map[string][]string, op, name string) string {
		req := map[string]any{"operation": op, "userInfo": map[string]any{"username": user, "extra": extra}}
		obj := map[string]any{"metadata": map[string]any{"name": name}}
		in := map[string]any{"request": req, "object": obj, "oldObject": nil, "variables": map[string]any{}}
		if op == "DELETE" {
			in["object"], in["oldObject"] = nil, obj
		}
		conds, _, _ := unstructured.NestedSlice(vap.Object, "spec", "matchConditions")
		for _, c := range conds {
			if eval(c.(map[string]any)["expression"].(string), in) != true {
				return "skip"
			}
		}
		vars, _, _ := unstructured.NestedSlice(vap.Object, "spec", "variables")
		vs := map[string]any{}
		for _, v := range vars {
			v := v.(map[string]any)
			in["variables"] = vs
			vs[v["name"].(string)] = eval(v["expression"].(string), in)
		}
		in["variables"] = vs
		vals, _, _ := unstructured.NestedSlice(vap.Object, "spec", "validations")
		for _, v := range vals {
			v := v.(map[string]any)
			if eval(v["expression"].(string), in) == true {
				continue
			}
			if me, ok := v["messageExpression"].(string); ok {
				return eval(me, in).(string)
			}
			return v["message"].(string)
		}
		return ""
	}
	agent := "system:serviceaccount:" + Namespace + ":" + DaemonSetName
	onA := map[string][]string{"authentication.kubernetes.io/node-name": {"node-a"}}
	for _, tt := range []struct {
		name, user string
		extra      map[string][]string
		op, target string
		want       string // "" admitted, "skip" not matched, else a part of the denial
	}{
		{"own node create", agent, onA, "CREATE", "node-a", ""},
		{"own node update", agent, onA, "UPDATE", "node-a", ""},
		{"own node delete", agent, onA, "DELETE", "node-a", ""},
		{"other node create", agent, onA, "CREATE", "node-b", "on node node-a may write only NodeState node-a, not node-b"},
		{"other node update", agent, onA, "UPDATE", "node-b", "not node-b"},
		{"other node delete", agent, onA, "DELETE", "node-b", "not node-b"},
		{"no claim", agent, nil, "UPDATE", "node-a", "no authentication.kubernetes.io/node-name claim"},
		{"empty claim", agent, map[string][]string{"authentication.kubernetes.io/node-name": {}}, "UPDATE", "node-a", "no authentication.kubernetes.io/node-name claim"},
		{"another user", "jane", nil, "UPDATE", "node-b", "skip"},
		{"another service account", "system:serviceaccount:" + Namespace + ":default", onA, "UPDATE", "node-b", "skip"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := decide(tt.user, tt.extra, tt.op, tt.target)
			if (tt.want == "" || tt.want == "skip") && got != tt.want || !strings.Contains(got, tt.want) {
				t.Errorf("%s %s by %s %v: got %q, want %q", tt.op, tt.target, tt.user, tt.extra, got, tt.want)
			}
		})
	}
}
