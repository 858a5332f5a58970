package kube

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"strings"

	authv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Permission is one verb on one resource, cluster-wide when Namespace is empty.
type Permission struct {
	Verb      string
	Group     string
	Resource  string
	Namespace string
}

func (p Permission) String() string {
	r := p.Resource
	if p.Group != "" {
		r += "." + p.Group
	}
	if p.Namespace != "" {
		return fmt.Sprintf("%s %s in %s", p.Verb, r, p.Namespace)
	}
	return p.Verb + " " + r
}

// Permissions expands verbs x resources into a list.
func Permissions(ns, group string, resources, verbs []string) []Permission {
	var out []Permission
	for _, r := range resources {
		for _, v := range verbs {
			out = append(out, Permission{Verb: v, Group: group, Resource: r, Namespace: ns})
		}
	}
	return out
}

// MissingPermissions asks the API server, one SelfSubjectAccessReview per
// permission, which of perms the current user lacks.
func (c *Clients) MissingPermissions(ctx context.Context, perms []Permission) ([]Permission, error) {
	var missing []Permission
	for _, p := range perms {
		resource, sub, _ := strings.Cut(p.Resource, "/")
		r, err := c.Kube.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx, &authv1.SelfSubjectAccessReview{
			Spec: authv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &authv1.ResourceAttributes{
				Verb: p.Verb, Group: p.Group, Resource: resource, Subresource: sub, Namespace: p.Namespace,
			}},
		}, metav1.CreateOptions{})
		if err != nil {
			return nil, fmt.Errorf("check permission to %s: %w", p, err)
		}
		slog.Debug("access review", "permission", p.String(), "allowed", r.Status.Allowed, "reason", r.Status.Reason)
		if !r.Status.Allowed {
			missing = append(missing, p)
		}
	}
	return missing, nil
}

// PermissionError names the permissions the user lacks, on one line.
type PermissionError struct{ Missing []Permission }

func (e *PermissionError) Error() string {
	const show = 4
	var names []string
	for i, p := range e.Missing {
		if i == show {
			names = append(names, fmt.Sprintf("and %d more", len(e.Missing)-show))
			break
		}
		names = append(names, p.String())
	}
	return "missing permissions: cannot " + strings.Join(names, ", ") + " (run as a cluster admin)"
}

// RequirePermissions fails with a PermissionError when any of perms is denied.
func (c *Clients) RequirePermissions(ctx context.Context, perms []Permission) error {
	missing, err := c.MissingPermissions(ctx, perms)
	if err != nil {
		return err
	}
	if len(missing) > 0 {
		return &PermissionError{Missing: missing}
	}
	return nil
}

// MinKernel is the oldest kernel the agent starts on: bpf_link for cgroup
// programs, BTF and the ring buffer are all there from 5.10 (an LTS release).
// It is only a coarse gate: each agent probes what every feature needs,
// helpers and kfuncs included (nodeagent/features), and a feature whose
// kernel lacks one reports it by name in `kubectl ebpf status` (service-lb
// needs bpf_set_retval, 5.18; closing UDP sockets needs bpf_sock_destroy,
// 6.5, without which only that part is off).
var MinKernel = [2]int{5, 10}

// CheckKernels refuses nodes whose kernel is older than MinKernel or unparsable.
func CheckKernels(nodes []corev1.Node) error {
	var bad []string
	for _, n := range nodes {
		k := n.Status.NodeInfo.KernelVersion
		major, minor, ok := ParseKernel(k)
		switch {
		case !ok:
			bad = append(bad, fmt.Sprintf("%s (kernel %q unrecognised)", n.Name, k))
		case major < MinKernel[0] || (major == MinKernel[0] && minor < MinKernel[1]):
			bad = append(bad, fmt.Sprintf("%s (kernel %s)", n.Name, k))
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("unsupported kernel: kubectl-ebpf needs Linux %d.%d or newer: %s", MinKernel[0], MinKernel[1], strings.Join(bad, ", "))
	}
	return nil
}

// ParseKernel reads major.minor from a release string like "6.18.0-1-amd64".
func ParseKernel(release string) (major, minor int, ok bool) {
	parts := strings.SplitN(release, ".", 3)
	if len(parts) < 2 {
		return 0, 0, false
	}
	major, err := strconv.Atoi(parts[0])
	if err != nil {
		return 0, 0, false
	}
	m := parts[1]
	if i := strings.IndexFunc(m, func(r rune) bool { return r < '0' || r > '9' }); i >= 0 {
		m = m[:i]
	}
	minor, err = strconv.Atoi(m)
	if err != nil {
		return 0, 0, false
	}
	return major, minor, true
}
