package v1alpha1

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"

	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions"
	apiextv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	crdvalidation "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/validation"
	structuralschema "k8s.io/apiextensions-apiserver/pkg/apiserver/schema"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/listtype"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/validation"
	celconfig "k8s.io/apiserver/pkg/apis/cel"
	"sigs.k8s.io/yaml"
)

// l7CRDSchema reads the generated CRD (what the plugin installs) and
// returns its schema the way an API server uses it.
func l7CRDSchema(t *testing.T) (*apiextensions.JSONSchemaProps, *structuralschema.Structural) {
	t.Helper()
	b, err := os.ReadFile("../../manifests/yaml/10-crds.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, doc := range bytes.Split(b, []byte("\n---\n")) {
		var crd apiextv1.CustomResourceDefinition
		if err := yaml.Unmarshal(doc, &crd); err != nil {
			t.Fatal(err)
		}
		if crd.Spec.Names.Kind != L7PolicyKind {
			continue
		}
		var in apiextensions.JSONSchemaProps
		if err := apiextv1.Convert_v1_JSONSchemaProps_To_apiextensions_JSONSchemaProps(crd.Spec.Versions[0].Schema.OpenAPIV3Schema, &in, nil); err != nil {
			t.Fatal(err)
		}
		ss, err := structuralschema.NewStructural(&in)
		if err != nil {
			t.Fatal(err)
		}
		return &in, ss
	}
	t.Fatal("no L7Policy CRD in manifests/yaml/10-crds.yaml")
	return nil, nil
}

// TestL7PolicyCRDSchema runs the generated OpenAPI schema and CEL rules the
// way the API server does (apiextensions-apiserver's validators), so the
// kubebuilder markers are proven, not just generated.
func TestL7PolicyCRDSchema(t *testing.T) {
	in, ss := l7CRDSchema(t)
	sv, _, err := validation.NewSchemaValidator(in)
	if err != nil {
		t.Fatal(err)
	}
	celv := cel.NewValidator(ss, true, celconfig.PerCallLimit)
	if celv == nil {
		t.Fatal("no CEL rules in the L7Policy schema")
	}
	const base = `
apiVersion: kubectl-ebpf.io/v1alpha1
kind: L7Policy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ports: [{port: 8080}]
  rules:
  - methods: [GET]
    path: {prefix: /public/}
    headers: [{name: x-tenant, exact: a}]
    from: [{podSelector: {matchLabels: {app: web}}}, {ipBlock: {cidr: 10.0.0.0/8}}]
`
	for _, tc := range []struct {
		name, old, new string
		want           string // substring of the errors; empty means valid
	}{
		{name: "valid"},
		{name: "two path kinds", old: "path: {prefix: /public/}", new: "path: {prefix: /public/, exact: /x}", want: "exactly one of exact, prefix or regex"},
		{name: "no path kind", old: "path: {prefix: /public/}", new: "path: {}", want: "exactly one of exact, prefix or regex"},
		{name: "method enum", old: "methods: [GET]", new: "methods: [get]", want: `Unsupported value: "get"`},
		{name: "duplicate method", old: "methods: [GET]", new: "methods: [GET, GET]", want: "Duplicate value"},
		{name: "exact without slash", old: "path: {prefix: /public/}", new: "path: {exact: public}", want: "should match '^/'"},
		{name: "header two kinds", old: "{name: x-tenant, exact: a}", new: "{name: x-tenant, exact: a, present: true}", want: "exactly one of exact, prefix or present"},
		{name: "header bad name", old: "{name: x-tenant, exact: a}", new: `{name: "x tenant", exact: a}`, want: "spec.rules[0].headers[0].name"},
		{name: "peer empty", old: "{ipBlock: {cidr: 10.0.0.0/8}}", new: "{}", want: "one of podSelector, namespaceSelector or ipBlock"},
		{name: "peer ipBlock and selector", old: "{ipBlock: {cidr: 10.0.0.0/8}}", new: "{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}", want: "ipBlock cannot be combined"},
		{name: "port range", old: "ports: [{port: 8080}]", new: "ports: [{port: 0}]", want: "spec.ports[0].port"},
		{name: "no ports", old: "ports: [{port: 8080}]", new: "ports: []", want: "spec.ports"},
		{name: "duplicate ports", old: "ports: [{port: 8080}]", new: "ports: [{port: 8080}, {port: 8080}]", want: "Duplicate value"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := base
			if tc.old != "" {
				if !strings.Contains(src, tc.old) {
					t.Fatalf("fixture lacks %q", tc.old)
				}
				src = strings.Replace(src, tc.old, tc.new, 1)
			}
			var obj map[string]any
			if err := yaml.Unmarshal([]byte(src), &obj); err != nil {
				t.Fatal(err)
			}
			errs := validation.ValidateCustomResource(nil, obj, sv)
			celErrs, _ := celv.Validate(context.Background(), nil, ss, obj, nil, celconfig.RuntimeCELCostBudget)
			errs = append(errs, celErrs...)
			errs = append(errs, listtype.ValidateListSetsAndMaps(nil, ss, obj)...)
			got := errs.ToAggregate()
			switch {
			case tc.want == "" && got != nil:
				t.Fatalf("want valid, got %v", got)
			case tc.want != "" && got == nil:
				t.Fatalf("want an error containing %q, got valid", tc.want)
			case tc.want != "" && !strings.Contains(got.Error(), tc.want):
				t.Fatalf("want an error containing %q, got %v", tc.want, got)
			}
		})
	}
}

// TestCRDsPassAPIServerValidation: every generated CRD passes the checks the
// API server runs when it is created: structural schema, list types, and
// the CEL rules compile within the cost budget.
func TestCRDsPassAPIServerValidation(t *testing.T) {
	b, err := os.ReadFile("../../manifests/yaml/10-crds.yaml")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, doc := range bytes.Split(b, []byte("\n---\n")) {
		var v1crd apiextv1.CustomResourceDefinition
		if err := yaml.Unmarshal(doc, &v1crd); err != nil {
			t.Fatal(err)
		}
		if v1crd.Name == "" {
			continue
		}
		apiextv1.SetObjectDefaults_CustomResourceDefinition(&v1crd)
		var crd apiextensions.CustomResourceDefinition
		if err := apiextv1.Convert_v1_CustomResourceDefinition_To_apiextensions_CustomResourceDefinition(&v1crd, &crd, nil); err != nil {
			t.Fatal(err)
		}
		if errs := crdvalidation.ValidateCustomResourceDefinition(context.Background(), &crd); len(errs) > 0 {
			t.Errorf("CRD %s: %v", crd.Name, errs.ToAggregate())
		}
		n++
	}
	if n != 2 {
		t.Errorf("%d CRDs, want 2 (l7policies, nodestates)", n)
	}
}
