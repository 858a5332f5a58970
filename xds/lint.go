package xds

import (
	"errors"
	"fmt"
	"regexp/syntax"
	"slices"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	rbacconfig "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	grpcal "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/grpc/v3"
	rbacfilter "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

// typeURLs are the configuration types each extension name must carry. An
// Any whose type does not match its filter's name is accepted by protobuf
// and by the generated validators, and rejected only by Envoy.
var typeURLs = map[string]string{
	wellknown.OriginalDestination:        "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
	wellknown.HTTPConnectionManager:      "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
	wellknown.HTTPRoleBasedAccessControl: "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
	wellknown.Router:                     "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
	wellknown.FileAccessLog:              "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
	wellknown.HTTPGRPCAccessLog:          "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
}

// Lint deep-validates a node's configuration: every message, including the
// ones packed in Any, passes its generated ValidateAll; and it checks what no
// generated validator does (XDS-FACTS.md): filter type URLs, the router last
// in every HTTP filter chain, RE2 syntax of every regex, every route's
// cluster exists, the ORIGINAL_DST cluster's shape, unique names.
func Lint(r *Resources) error {
	var errs []error
	add := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }

	clusters := map[string]bool{}
	for _, c := range r.Clusters {
		if clusters[c.GetName()] {
			add("cluster %q: duplicate name", c.GetName())
		}
		clusters[c.GetName()] = true
		errs = append(errs, deepValidate("cluster "+c.GetName(), c)...)
		if c.GetType() == cluster.Cluster_ORIGINAL_DST {
			if c.GetLbPolicy() != cluster.Cluster_CLUSTER_PROVIDED {
				add("cluster %q: ORIGINAL_DST needs lb_policy CLUSTER_PROVIDED, has %s", c.GetName(), c.GetLbPolicy())
			}
			if c.GetLoadAssignment() != nil {
				add("cluster %q: ORIGINAL_DST must not have a load_assignment", c.GetName())
			}
		}
		if c.GetType() == cluster.Cluster_STATIC && len(c.GetLoadAssignment().GetEndpoints()) == 0 {
			add("cluster %q: STATIC without endpoints", c.GetName())
		}
	}
	listeners := map[string]bool{}
	for _, l := range r.Listeners {
		where := "listener " + l.GetName()
		if listeners[l.GetName()] {
			add("%s: duplicate name", where)
		}
		listeners[l.GetName()] = true
		errs = append(errs, deepValidate(where, l)...)
		for i, lf := range l.GetListenerFilters() {
			errs = append(errs, checkTypeURL(fmt.Sprintf("%s listener_filters[%d]", where, i), lf.GetName(), lf.GetTypedConfig())...)
		}
		chains := map[string]bool{}
		matches := map[string]bool{}
		all := l.GetFilterChains()
		if l.GetDefaultFilterChain() == nil {
			add("%s: no default_filter_chain (unselected destinations must fail closed)", where)
		} else {
			all = append(slices.Clip(all), l.GetDefaultFilterChain())
		}
		if len(all) == 0 {
			add("%s: no filter chain (Envoy rejects the listener)", where)
		}
		for i, fc := range all {
			isDefault := fc == l.GetDefaultFilterChain()
			fcw := fmt.Sprintf("%s filter_chains[%d] %q", where, i, fc.GetName())
			if isDefault {
				fcw = fmt.Sprintf("%s default_filter_chain %q", where, fc.GetName())
			}
			if chains[fc.GetName()] {
				add("%s: duplicate filter chain name", fcw)
			}
			chains[fc.GetName()] = true
			key := fmt.Sprint(fc.GetFilterChainMatch())
			if matches[key] {
				add("%s: same filter_chain_match as an earlier chain", fcw)
			}
			matches[key] = true
			for j, f := range fc.GetFilters() {
				fw := fmt.Sprintf("%s filters[%d]", fcw, j)
				errs = append(errs, checkTypeURL(fw, f.GetName(), f.GetTypedConfig())...)
				if f.GetName() != wellknown.HTTPConnectionManager {
					continue
				}
				var m hcm.HttpConnectionManager
				if err := f.GetTypedConfig().UnmarshalTo(&m); err != nil {
					add("%s: %v", fw, err)
					continue
				}
				errs = append(errs, lintHCM(fw, &m, clusters)...)
				errs = append(errs, lintRBAC(fw, &m, isDefault)...)
			}
		}
	}
	return errors.Join(errs...)
}

func lintHCM(where string, m *hcm.HttpConnectionManager, clusters map[string]bool) []error {
	var errs []error
	hf := m.GetHttpFilters()
	if len(hf) == 0 {
		errs = append(errs, fmt.Errorf("%s: no http_filters (the router is required)", where))
	}
	for i, f := range hf {
		errs = append(errs, checkTypeURL(fmt.Sprintf("%s http_filters[%d]", where, i), f.GetName(), f.GetTypedConfig())...)
		isRouter := f.GetTypedConfig().GetTypeUrl() == typeURLs[wellknown.Router]
		if isRouter != (i == len(hf)-1) {
			errs = append(errs, fmt.Errorf("%s http_filters[%d] %q: the router must be the last filter, and only the last", where, i, f.GetName()))
		}
	}
	for i, al := range m.GetAccessLog() {
		alw := fmt.Sprintf("%s access_log[%d]", where, i)
		errs = append(errs, checkTypeURL(alw, al.GetName(), al.GetTypedConfig())...)
		if al.GetName() != wellknown.HTTPGRPCAccessLog {
			continue
		}
		var g grpcal.HttpGrpcAccessLogConfig
		if err := al.GetTypedConfig().UnmarshalTo(&g); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", alw, err))
		} else if c := g.GetCommonConfig().GetGrpcService().GetEnvoyGrpc().GetClusterName(); !clusters[c] {
			errs = append(errs, fmt.Errorf("%s: ALS cluster %q does not exist", alw, c))
		}
	}
	rc := m.GetRouteConfig()
	if rc == nil {
		errs = append(errs, fmt.Errorf("%s: no inline route_config", where))
	}
	for _, vh := range rc.GetVirtualHosts() {
		for i, r := range vh.GetRoutes() {
			name := r.GetRoute().GetCluster()
			switch {
			case r.GetRoute() == nil:
				errs = append(errs, fmt.Errorf("%s route %s[%d]: not a route action", where, vh.GetName(), i))
			case name == "":
				errs = append(errs, fmt.Errorf("%s route %s[%d]: only a named cluster is supported", where, vh.GetName(), i))
			case !clusters[name]:
				errs = append(errs, fmt.Errorf("%s route %s[%d]: cluster %q does not exist", where, vh.GetName(), i, name))
			}
		}
	}
	return errs
}

// lintRBAC: every chain enforces RBAC first, as ALLOW (default deny); the
// default chain allows nothing.
func lintRBAC(where string, m *hcm.HttpConnectionManager, isDefault bool) []error {
	hf := m.GetHttpFilters()
	if len(hf) == 0 || hf[0].GetTypedConfig().GetTypeUrl() != typeURLs[wellknown.HTTPRoleBasedAccessControl] {
		return []error{fmt.Errorf("%s: the first HTTP filter must be RBAC", where)}
	}
	var rb rbacfilter.RBAC
	if err := hf[0].GetTypedConfig().UnmarshalTo(&rb); err != nil {
		return []error{fmt.Errorf("%s: %w", where, err)}
	}
	switch {
	case rb.GetRules() == nil:
		return []error{fmt.Errorf("%s: RBAC without rules allows everything", where)}
	case rb.GetRules().GetAction() != rbacconfig.RBAC_ALLOW:
		return []error{fmt.Errorf("%s: RBAC action %s, want ALLOW (default deny)", where, rb.GetRules().GetAction())}
	case rb.GetShadowRules() != nil:
		return []error{fmt.Errorf("%s: shadow rules are not built by us", where)}
	case isDefault && len(rb.GetRules().GetPolicies()) > 0:
		return []error{fmt.Errorf("%s: the default chain must allow nothing, has %d policies", where, len(rb.GetRules().GetPolicies()))}
	}
	return nil
}

func checkTypeURL(where, name string, a *anypb.Any) []error {
	want, ok := typeURLs[name]
	switch {
	case a == nil:
		return []error{fmt.Errorf("%s %q: no typed_config", where, name)}
	case !ok:
		return []error{fmt.Errorf("%s: unknown extension name %q", where, name)}
	case a.GetTypeUrl() != want:
		return []error{fmt.Errorf("%s %q: typed_config is %s, want %s", where, name, a.GetTypeUrl(), want)}
	}
	return nil
}

// deepValidate runs ValidateAll on m and on every message inside it,
// unpacking each Any (the generated validators stop at an Any), and checks
// every regex for RE2 syntax.
func deepValidate(where string, m proto.Message) []error {
	var errs []error
	var walk func(path string, m protoreflect.Message)
	walk = func(path string, m protoreflect.Message) {
		if !m.IsValid() {
			return
		}
		msg := m.Interface()
		if a, ok := msg.(*anypb.Any); ok {
			inner, err := a.UnmarshalNew()
			if err != nil {
				errs = append(errs, fmt.Errorf("%s %s: unpack %s: %w", where, path, a.GetTypeUrl(), err))
				return
			}
			if v, ok := inner.(interface{ ValidateAll() error }); ok {
				if err := v.ValidateAll(); err != nil {
					errs = append(errs, fmt.Errorf("%s %s (%s): %w", where, path, a.GetTypeUrl(), err))
				}
			}
			walk(path, inner.ProtoReflect())
			return
		}
		if re, ok := msg.(*matcher.RegexMatcher); ok {
			if _, err := syntax.Parse(re.GetRegex(), syntax.Perl); err != nil {
				errs = append(errs, fmt.Errorf("%s %s: regex %q: %w", where, path, re.GetRegex(), err))
			}
		}
		m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			p := path + "." + string(fd.Name())
			switch {
			case fd.IsMap() && fd.MapValue().Message() != nil:
				v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
					walk(fmt.Sprintf("%s[%v]", p, k.Interface()), mv.Message())
					return true
				})
			case fd.IsList() && fd.Message() != nil:
				l := v.List()
				for i := 0; i < l.Len(); i++ {
					walk(fmt.Sprintf("%s[%d]", p, i), l.Get(i).Message())
				}
			case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
				walk(p, v.Message())
			}
			return true
		})
	}
	if v, ok := m.(interface{ ValidateAll() error }); ok {
		if err := v.ValidateAll(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", where, err))
		}
	}
	walk("", m.ProtoReflect())
	return errs
}
