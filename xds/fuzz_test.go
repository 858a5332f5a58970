package xds

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

var (
	fuzzRegexes = []string{`/orders/[0-9]+`, `/(a|b)/.*`, `/[[:alpha:]]+`, `(?i)/API/v[0-9]+`, `/\pL+/x`, `/.*\.json`}
	fuzzLabels  = []map[string]string{{"app": "api"}, {"app": "web"}, {"tier": "db"}, {}}
)

// randomPolicy makes a policy from rng and the strings s; it may be invalid
// (strings come from the fuzzer), which the caller checks.
func randomPolicy(rng *rand.Rand, i int, s []string) *v1alpha1.L7Policy {
	pick := func(n int) int { return rng.IntN(n) }
	str := func() string { return s[pick(len(s))] }
	p := &v1alpha1.L7Policy{ObjectMeta: metav1.ObjectMeta{Namespace: []string{"shop", "ops"}[pick(2)], Name: fmt.Sprintf("p%d", i)}}
	p.Spec.PodSelector = metav1.LabelSelector{MatchLabels: fuzzLabels[pick(len(fuzzLabels))]}
	for _, port := range rng.Perm(4)[:1+pick(3)] {
		p.Spec.Ports = append(p.Spec.Ports, v1alpha1.L7PolicyPort{Port: int32(8080 + port)})
	}
	for r := pick(4); r > 0; r-- {
		var rule v1alpha1.HTTPRule
		for _, m := range rng.Perm(len(v1alpha1.HTTPMethods))[:pick(3)] {
			rule.Methods = append(rule.Methods, v1alpha1.HTTPMethods[m])
		}
		switch pick(5) {
		case 0:
			rule.Path = &v1alpha1.HTTPPathMatch{Exact: ptr("/" + str())}
		case 1:
			rule.Path = &v1alpha1.HTTPPathMatch{Prefix: ptr("/" + str())}
		case 2:
			rule.Path = &v1alpha1.HTTPPathMatch{Regex: ptr(fuzzRegexes[pick(len(fuzzRegexes))])}
		case 3:
			rule.Path = &v1alpha1.HTTPPathMatch{Regex: ptr(str())}
		}
		for h := pick(3); h > 0; h-- {
			hm := v1alpha1.HTTPHeaderMatch{Name: []string{"x-tenant", "X-Debug", ":authority", str()}[pick(4)]}
			switch pick(3) {
			case 0:
				hm.Exact = ptr(str())
			case 1:
				hm.Prefix = ptr(str())
			default:
				hm.Present = ptr(pick(2) == 0)
			}
			rule.Headers = append(rule.Headers, hm)
		}
		for f := pick(3); f > 0; f-- {
			switch pick(4) {
			case 0:
				rule.From = append(rule.From, v1alpha1.L7Peer{PodSelector: &metav1.LabelSelector{MatchLabels: fuzzLabels[pick(len(fuzzLabels))]}})
			case 1:
				rule.From = append(rule.From, v1alpha1.L7Peer{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "ops"}}})
			case 2:
				rule.From = append(rule.From, v1alpha1.L7Peer{
					PodSelector:       &metav1.LabelSelector{MatchLabels: fuzzLabels[pick(len(fuzzLabels))]},
					NamespaceSelector: &metav1.LabelSelector{},
				})
			default:
				rule.From = append(rule.From, v1alpha1.L7Peer{IPBlock: &v1alpha1.IPBlock{CIDR: []string{"10.0.0.0/8", "fd00::/16", str()}[pick(3)], Except: []string{"10.1.0.0/16"}[:pick(2)]}})
			}
		}
		p.Spec.Rules = append(p.Spec.Rules, rule)
	}
	return p
}

// randomInput: up to four policies over the fixture's pods.
func randomInput(rng *rand.Rand, s []string) Input {
	in := shopInput(netip.MustParseAddr("10.0.1.10"), 8080)
	in.Policies = nil
	for i := rng.IntN(5); i > 0; i-- {
		p := randomPolicy(rng, i, s)
		if len(v1alpha1.ValidateL7Policy(p)) == 0 {
			in.Policies = append(in.Policies, p)
		}
	}
	return in
}

// FuzzBuild: for every set of valid policies, Build succeeds, Lint passes,
// the snapshot is consistent and the version is stable. Longer runs:
// go test -run '^$' -fuzz FuzzBuild -fuzztime 60s ./xds
func FuzzBuild(f *testing.F) {
	f.Add(uint64(1), uint64(2), "api", "v1/", `/x[0-9]+`)
	f.Add(uint64(7), uint64(9), "a b", "\x00", `(?=x)`)
	f.Fuzz(func(t *testing.T, a, b uint64, s1, s2, s3 string) {
		in := randomInput(rand.New(rand.NewPCG(a, b)), []string{s1, s2, s3})
		r, err := Build(in, "n1", Options{AccessLogPath: "/dev/stdout"})
		if err != nil {
			t.Fatalf("valid policies, Build failed: %v", err)
		}
		if err := Lint(r); err != nil {
			t.Fatalf("lint: %v", err)
		}
		if _, err := r.Snapshot(); err != nil {
			t.Fatal(err)
		}
		again, _ := Build(in, "n1", Options{AccessLogPath: "/dev/stdout"})
		if again.Version != r.Version {
			t.Fatal("same input, different version")
		}
	})
}
