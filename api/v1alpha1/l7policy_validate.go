package v1alpha1

import (
	"fmt"
	"net/netip"
	"regexp/syntax"
	"strings"
	"unicode/utf8"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// Limits the CRD schema also enforces; repeated here so objects that never
// went through an API server (tests, dry runs, older CRDs) get the same answer.
const (
	maxL7Ports     = 16
	maxL7Rules     = 64
	maxL7Headers   = 16
	maxL7Peers     = 16
	maxL7PathLen   = 1024
	maxL7HeaderLen = 4096
	// maxRegexInsts mirrors Envoy's runtime re2.max_program_size.error_level
	// (default 100): Envoy 1.40 NACKs a listener with a larger regex
	// ("RE2 program size of 312 > max program size of 100"). Go's compiled
	// instruction count tracks RE2's program size closely (310 against 312
	// for "/orders/[a-z]{300}"), not exactly: a regex right at the limit may
	// still be rejected by Envoy, which the xDS server's NACK path reports.
	maxRegexInsts = 100
)

// ValidateL7Policy checks what the CRD schema cannot, or what must hold even
// when the schema was bypassed: regex syntax in RE2 (the engine Envoy uses;
// Go's regexp/syntax with syntax.Perl flags parses exactly RE2), selectors,
// CIDRs, header names and values. Errors name the field path, e.g.
// spec.rules[0].path.regex. A policy the agent sees with errors is marked
// Accepted=False and never reaches Envoy.
func ValidateL7Policy(p *L7Policy) field.ErrorList {
	var errs field.ErrorList
	spec := field.NewPath("spec")
	errs = append(errs, validateSelector(&p.Spec.PodSelector, spec.Child("podSelector"))...)

	ports := spec.Child("ports")
	if len(p.Spec.Ports) == 0 {
		errs = append(errs, field.Required(ports, "at least one port"))
	}
	if len(p.Spec.Ports) > maxL7Ports {
		errs = append(errs, field.TooMany(ports, len(p.Spec.Ports), maxL7Ports))
	}
	seen := map[int32]bool{}
	for i, pp := range p.Spec.Ports {
		fp := ports.Index(i).Child("port")
		if pp.Port < 1 || pp.Port > 65535 {
			errs = append(errs, field.Invalid(fp, pp.Port, "must be 1-65535"))
		} else if seen[pp.Port] {
			errs = append(errs, field.Duplicate(fp, pp.Port))
		}
		seen[pp.Port] = true
	}

	rules := spec.Child("rules")
	if len(p.Spec.Rules) > maxL7Rules {
		errs = append(errs, field.TooMany(rules, len(p.Spec.Rules), maxL7Rules))
	}
	for i := range p.Spec.Rules {
		errs = append(errs, validateRule(&p.Spec.Rules[i], rules.Index(i))...)
	}
	return errs
}

func validateRule(r *HTTPRule, fp *field.Path) field.ErrorList {
	var errs field.ErrorList
	seen := map[HTTPMethod]bool{}
	for i, m := range r.Methods {
		mp := fp.Child("methods").Index(i)
		if !validMethod(m) {
			errs = append(errs, field.NotSupported(mp, m, methodStrings()))
		} else if seen[m] {
			errs = append(errs, field.Duplicate(mp, m))
		}
		seen[m] = true
	}
	if r.Path != nil {
		errs = append(errs, validatePath(r.Path, fp.Child("path"))...)
	}
	if len(r.Headers) > maxL7Headers {
		errs = append(errs, field.TooMany(fp.Child("headers"), len(r.Headers), maxL7Headers))
	}
	for i := range r.Headers {
		errs = append(errs, validateHeader(&r.Headers[i], fp.Child("headers").Index(i))...)
	}
	if len(r.From) > maxL7Peers {
		errs = append(errs, field.TooMany(fp.Child("from"), len(r.From), maxL7Peers))
	}
	for i := range r.From {
		errs = append(errs, validatePeer(&r.From[i], fp.Child("from").Index(i))...)
	}
	return errs
}

func validatePath(m *HTTPPathMatch, fp *field.Path) field.ErrorList {
	var errs field.ErrorList
	n := 0
	if m.Exact != nil {
		n++
		errs = append(errs, validatePathString(*m.Exact, fp.Child("exact"))...)
	}
	if m.Prefix != nil {
		n++
		errs = append(errs, validatePathString(*m.Prefix, fp.Child("prefix"))...)
	}
	if m.Regex != nil {
		n++
		errs = append(errs, ValidateRE2(*m.Regex, fp.Child("regex"))...)
	}
	if n != 1 {
		errs = append(errs, field.Invalid(fp, n, "exactly one of exact, prefix or regex must be set"))
	}
	return errs
}

func validatePathString(s string, fp *field.Path) field.ErrorList {
	switch {
	case !strings.HasPrefix(s, "/"):
		return field.ErrorList{field.Invalid(fp, s, `must start with "/"`)}
	case len(s) > maxL7PathLen:
		return field.ErrorList{field.TooLong(fp, s, maxL7PathLen)}
	case strings.ContainsAny(s, "?#"):
		return field.ErrorList{field.Invalid(fp, s, "must not contain a query (?) or fragment (#): the path is matched without them")}
	case !printableASCII(s):
		return field.ErrorList{field.Invalid(fp, s, "must be printable ASCII without spaces (percent-encode other bytes)")}
	}
	return nil
}

// ValidateRE2 checks that s is a valid RE2 regular expression as Envoy's
// google_re2 engine reads it (the whole value must match).
func ValidateRE2(s string, fp *field.Path) field.ErrorList {
	if s == "" {
		return field.ErrorList{field.Required(fp, "an RE2 regular expression")}
	}
	if len(s) > maxL7PathLen {
		return field.ErrorList{field.TooLong(fp, s, maxL7PathLen)}
	}
	re, err := syntax.Parse(s, syntax.Perl)
	if err != nil {
		return field.ErrorList{field.Invalid(fp, s, "not RE2 syntax: "+err.Error())}
	}
	prog, err := syntax.Compile(re.Simplify())
	if err != nil {
		return field.ErrorList{field.Invalid(fp, s, "not RE2 syntax: "+err.Error())}
	}
	if len(prog.Inst) > maxRegexInsts {
		return field.ErrorList{field.Invalid(fp, s, fmt.Sprintf("too complex for Envoy: program size about %d, at most %d (Envoy's re2.max_program_size); use a shorter pattern or + instead of {n,m}", len(prog.Inst), maxRegexInsts))}
	}
	return nil
}

func validateHeader(h *HTTPHeaderMatch, fp *field.Path) field.ErrorList {
	var errs field.ErrorList
	if !validHeaderName(h.Name) {
		errs = append(errs, field.Invalid(fp.Child("name"), h.Name, "must be an HTTP header name (token characters, optionally a leading ':' for a pseudo-header)"))
	}
	n := 0
	for _, v := range []struct {
		name string
		val  *string
	}{{"exact", h.Exact}, {"prefix", h.Prefix}} {
		if v.val == nil {
			continue
		}
		n++
		vp := fp.Child(v.name)
		switch {
		case len(*v.val) > maxL7HeaderLen:
			errs = append(errs, field.TooLong(vp, *v.val, maxL7HeaderLen))
		case strings.ContainsAny(*v.val, "\r\n\x00"):
			errs = append(errs, field.Invalid(vp, *v.val, "must not contain CR, LF or NUL"))
		case !utf8.ValidString(*v.val):
			// Envoy's config is protobuf, whose strings are UTF-8.
			errs = append(errs, field.Invalid(vp, *v.val, "must be valid UTF-8"))
		case v.name == "prefix" && *v.val == "":
			errs = append(errs, field.Required(vp, "an empty prefix matches everything: use present: true"))
		}
	}
	if h.Present != nil {
		n++
	}
	if n != 1 {
		errs = append(errs, field.Invalid(fp, n, "exactly one of exact, prefix or present must be set"))
	}
	return errs
}

func validatePeer(p *L7Peer, fp *field.Path) field.ErrorList {
	var errs field.ErrorList
	if p.PodSelector == nil && p.NamespaceSelector == nil && p.IPBlock == nil {
		errs = append(errs, field.Required(fp, "one of podSelector, namespaceSelector or ipBlock"))
	}
	if p.IPBlock != nil && (p.PodSelector != nil || p.NamespaceSelector != nil) {
		errs = append(errs, field.Forbidden(fp.Child("ipBlock"), "cannot be combined with podSelector or namespaceSelector"))
	}
	if p.PodSelector != nil {
		errs = append(errs, validateSelector(p.PodSelector, fp.Child("podSelector"))...)
	}
	if p.NamespaceSelector != nil {
		errs = append(errs, validateSelector(p.NamespaceSelector, fp.Child("namespaceSelector"))...)
	}
	if b := p.IPBlock; b != nil {
		bp := fp.Child("ipBlock")
		outer, err := netip.ParsePrefix(b.CIDR)
		if err != nil {
			errs = append(errs, field.Invalid(bp.Child("cidr"), b.CIDR, "not a CIDR: "+err.Error()))
		}
		for i, e := range b.Except {
			ep := bp.Child("except").Index(i)
			in, err := netip.ParsePrefix(e)
			switch {
			case err != nil:
				errs = append(errs, field.Invalid(ep, e, "not a CIDR: "+err.Error()))
			case outer.IsValid() && (in.Addr().Is4() != outer.Addr().Is4() || in.Bits() < outer.Bits() || !outer.Contains(in.Addr())):
				errs = append(errs, field.Invalid(ep, e, "must lie inside cidr "+b.CIDR))
			}
		}
	}
	return errs
}

func validateSelector(s *metav1.LabelSelector, fp *field.Path) field.ErrorList {
	if _, err := metav1.LabelSelectorAsSelector(s); err != nil {
		return field.ErrorList{field.Invalid(fp, s.String(), err.Error())}
	}
	return nil
}

func validMethod(m HTTPMethod) bool {
	for _, k := range HTTPMethods {
		if m == k {
			return true
		}
	}
	return false
}

func methodStrings() []string {
	out := make([]string, len(HTTPMethods))
	for i, m := range HTTPMethods {
		out[i] = string(m)
	}
	return out
}

func validHeaderName(s string) bool {
	s = strings.TrimPrefix(s, ":")
	if s == "" || len(s) > 256 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return true
}
