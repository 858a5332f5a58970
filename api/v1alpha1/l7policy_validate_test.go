package v1alpha1

import (
	"regexp"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func ptr[T any](v T) *T { return &v }

func validPolicy() *L7Policy {
	return &L7Policy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "api"},
		Spec: L7PolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "api"}},
			Ports:       []L7PolicyPort{{Port: 8080}},
			Rules: []HTTPRule{
				{Methods: []HTTPMethod{"GET"}, Path: &HTTPPathMatch{Prefix: ptr("/public/")}},
				{
					Methods: []HTTPMethod{"POST", "PUT"},
					Path:    &HTTPPathMatch{Regex: ptr(`/orders/[0-9]+`)},
					Headers: []HTTPHeaderMatch{{Name: "x-tenant", Exact: ptr("a")}, {Name: "authorization", Present: ptr(true)}},
					From: []L7Peer{
						{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}},
						{IPBlock: &IPBlock{CIDR: "10.0.0.0/8", Except: []string{"10.1.0.0/16"}}},
					},
				},
			},
		},
	}
}

func TestValidateL7Policy(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(p *L7Policy)
		want   string // substring of the error list; empty means valid
	}{
		{name: "valid", mutate: func(*L7Policy) {}},
		{name: "no rules is deny-all, valid", mutate: func(p *L7Policy) { p.Spec.Rules = nil }},
		{name: "empty rule allows all, valid", mutate: func(p *L7Policy) { p.Spec.Rules = []HTTPRule{{}} }},
		{name: "no ports", mutate: func(p *L7Policy) { p.Spec.Ports = nil }, want: "spec.ports: Required"},
		{name: "port zero", mutate: func(p *L7Policy) { p.Spec.Ports[0].Port = 0 }, want: "spec.ports[0].port: Invalid value: 0"},
		{name: "port too big", mutate: func(p *L7Policy) { p.Spec.Ports[0].Port = 65536 }, want: "spec.ports[0].port"},
		{name: "duplicate port", mutate: func(p *L7Policy) { p.Spec.Ports = append(p.Spec.Ports, L7PolicyPort{Port: 8080}) }, want: "spec.ports[1].port: Duplicate value"},
		{name: "bad method", mutate: func(p *L7Policy) { p.Spec.Rules[0].Methods = []HTTPMethod{"get"} }, want: `spec.rules[0].methods[0]: Unsupported value: "get"`},
		{name: "duplicate method", mutate: func(p *L7Policy) { p.Spec.Rules[1].Methods = []HTTPMethod{"PUT", "PUT"} }, want: "spec.rules[1].methods[1]: Duplicate value"},
		{name: "two path kinds", mutate: func(p *L7Policy) { p.Spec.Rules[0].Path.Exact = ptr("/x") }, want: "spec.rules[0].path: Invalid value: 2: exactly one of exact, prefix or regex"},
		{name: "no path kind", mutate: func(p *L7Policy) { p.Spec.Rules[0].Path = &HTTPPathMatch{} }, want: "spec.rules[0].path: Invalid value: 0"},
		{name: "exact without slash", mutate: func(p *L7Policy) { p.Spec.Rules[0].Path = &HTTPPathMatch{Exact: ptr("healthz")} }, want: `spec.rules[0].path.exact: Invalid value: "healthz": must start with "/"`},
		{name: "prefix with query", mutate: func(p *L7Policy) { p.Spec.Rules[0].Path = &HTTPPathMatch{Prefix: ptr("/a?b=1")} }, want: "spec.rules[0].path.prefix"},
		{name: "prefix with space", mutate: func(p *L7Policy) { p.Spec.Rules[0].Path = &HTTPPathMatch{Prefix: ptr("/a b")} }, want: "printable ASCII"},
		{name: "regex unbalanced", mutate: func(p *L7Policy) { p.Spec.Rules[1].Path.Regex = ptr("/orders/([0-9]+") }, want: "spec.rules[1].path.regex: Invalid value: \"/orders/([0-9]+\": not RE2 syntax: error parsing regexp: missing closing )"},
		{name: "regex backreference is not RE2", mutate: func(p *L7Policy) { p.Spec.Rules[1].Path.Regex = ptr(`/(a)\1`) }, want: "spec.rules[1].path.regex"},
		{name: "regex lookahead is not RE2", mutate: func(p *L7Policy) { p.Spec.Rules[1].Path.Regex = ptr(`/(?=a)`) }, want: "not RE2 syntax"},
		{name: "regex empty", mutate: func(p *L7Policy) { p.Spec.Rules[1].Path.Regex = ptr("") }, want: "spec.rules[1].path.regex: Required"},
		{name: "regex too complex", mutate: func(p *L7Policy) { p.Spec.Rules[1].Path.Regex = ptr(`/[a-z]{1000}`) }, want: "too complex"},
		{name: "regex over Envoy's program size", mutate: func(p *L7Policy) { p.Spec.Rules[1].Path.Regex = ptr(`/orders/[a-z]{300}`) }, want: "too complex for Envoy: program size about 310, at most 100"},
		{name: "regex bounded repeat too big", mutate: func(p *L7Policy) { p.Spec.Rules[1].Path.Regex = ptr(`/api/v[0-9]+/users/[a-z0-9-]{1,64}`) }, want: "too complex"},
		{name: "regex realistic", mutate: func(p *L7Policy) {
			p.Spec.Rules[1].Path.Regex = ptr(`/api/v[0-9]+/users/[a-z0-9-]+/(orders|carts)/[0-9]+`)
		}},
		{name: "header bad name", mutate: func(p *L7Policy) { p.Spec.Rules[1].Headers[0].Name = "x tenant" }, want: `spec.rules[1].headers[0].name: Invalid value: "x tenant"`},
		{name: "header two kinds", mutate: func(p *L7Policy) { p.Spec.Rules[1].Headers[0].Prefix = ptr("b") }, want: "spec.rules[1].headers[0]: Invalid value: 2"},
		{name: "header no kind", mutate: func(p *L7Policy) { p.Spec.Rules[1].Headers[1].Present = nil }, want: "spec.rules[1].headers[1]: Invalid value: 0"},
		{name: "header value CRLF", mutate: func(p *L7Policy) { p.Spec.Rules[1].Headers[0].Exact = ptr("a\r\nx: y") }, want: "spec.rules[1].headers[0].exact"},
		{name: "header value not UTF-8", mutate: func(p *L7Policy) { p.Spec.Rules[1].Headers[0].Exact = ptr("\xfd") }, want: "spec.rules[1].headers[0].exact: Invalid value: \"\\xfd\": must be valid UTF-8"},
		{name: "header empty prefix", mutate: func(p *L7Policy) {
			p.Spec.Rules[1].Headers[0] = HTTPHeaderMatch{Name: "x", Prefix: ptr("")}
		}, want: "spec.rules[1].headers[0].prefix: Required"},
		{name: "pseudo header ok", mutate: func(p *L7Policy) {
			p.Spec.Rules[1].Headers[0] = HTTPHeaderMatch{Name: ":authority", Exact: ptr("api.shop")}
		}},
		{name: "peer empty", mutate: func(p *L7Policy) { p.Spec.Rules[1].From[0] = L7Peer{} }, want: "spec.rules[1].from[0]: Required"},
		{name: "peer ipBlock with selector", mutate: func(p *L7Policy) {
			p.Spec.Rules[1].From[1].PodSelector = &metav1.LabelSelector{}
		}, want: "spec.rules[1].from[1].ipBlock: Forbidden"},
		{name: "bad cidr", mutate: func(p *L7Policy) { p.Spec.Rules[1].From[1].IPBlock.CIDR = "10.0.0.0/33" }, want: "spec.rules[1].from[1].ipBlock.cidr"},
		{name: "except outside", mutate: func(p *L7Policy) { p.Spec.Rules[1].From[1].IPBlock.Except = []string{"11.0.0.0/16"} }, want: "spec.rules[1].from[1].ipBlock.except[0]: Invalid value: \"11.0.0.0/16\": must lie inside cidr 10.0.0.0/8"},
		{name: "except wider", mutate: func(p *L7Policy) { p.Spec.Rules[1].From[1].IPBlock.Except = []string{"10.0.0.0/7"} }, want: "must lie inside"},
		{name: "bad selector", mutate: func(p *L7Policy) {
			p.Spec.PodSelector = metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "app", Operator: "Near"}}}
		}, want: "spec.podSelector"},
		{name: "bad namespace selector", mutate: func(p *L7Policy) {
			p.Spec.Rules[1].From[0].NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"bad key!": "x"}}
		}, want: "spec.rules[1].from[0].namespaceSelector"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := validPolicy()
			tc.mutate(p)
			errs := ValidateL7Policy(p)
			got := errs.ToAggregate()
			switch {
			case tc.want == "" && got != nil:
				t.Fatalf("want valid, got %v", got)
			case tc.want != "" && got == nil:
				t.Fatalf("want error containing %q, got valid", tc.want)
			case tc.want != "" && !strings.Contains(got.Error(), tc.want):
				t.Fatalf("want error containing %q, got %v", tc.want, got)
			}
		})
	}
}

// FuzzValidateRE2: whatever ValidateRE2 accepts compiles with Go's RE2
// engine (so the check is not looser than a real RE2 parser), and nothing
// panics. Run longer with: go test -run '^$' -fuzz FuzzValidateRE2 ./api/v1alpha1
func FuzzValidateRE2(f *testing.F) {
	for _, s := range []string{`/orders/[0-9]+`, `/(a)\1`, `(?=x)`, `[[:alpha:]]`, `\pL+`, `a{1001}`, `(?i)/API/.*`, `\C`, `(?P<n>x)`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if errs := ValidateRE2(s, nil); len(errs) == 0 {
			if _, err := regexp.Compile(s); err != nil {
				t.Fatalf("ValidateRE2 accepted %q, regexp rejects it: %v", s, err)
			}
		}
	})
}

// FuzzValidateL7Policy feeds arbitrary strings into every string field.
func FuzzValidateL7Policy(f *testing.F) {
	f.Add("/a", "/b", `/c[0-9]+`, "x-h", "v", "10.0.0.0/8", "10.1.0.0/16", "GET", int32(80))
	f.Fuzz(func(t *testing.T, exact, prefix, regex, hname, hval, cidr, except, method string, port int32) {
		p := validPolicy()
		p.Spec.Ports[0].Port = port
		p.Spec.Rules[0].Methods = []HTTPMethod{HTTPMethod(method)}
		p.Spec.Rules[0].Path = &HTTPPathMatch{Exact: &exact}
		p.Spec.Rules = append(p.Spec.Rules, HTTPRule{Path: &HTTPPathMatch{Prefix: &prefix}}, HTTPRule{Path: &HTTPPathMatch{Regex: &regex}})
		p.Spec.Rules[1].Headers[0] = HTTPHeaderMatch{Name: hname, Exact: &hval}
		p.Spec.Rules[1].From[1].IPBlock = &IPBlock{CIDR: cidr, Except: []string{except}}
		if errs := ValidateL7Policy(p); len(errs) == 0 {
			if _, err := regexp.Compile(regex); err != nil {
				t.Fatalf("accepted regex %q: %v", regex, err)
			}
			if !strings.HasPrefix(exact, "/") || !strings.HasPrefix(prefix, "/") {
				t.Fatalf("accepted a path without leading slash: %q %q", exact, prefix)
			}
		}
	})
}
