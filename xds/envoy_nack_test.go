package xds

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	rbacconfig "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/kubectl-ebpf/kubectl-ebpf/xds/envoytest"
)

// TestIntegrationEnvoyNack: a configuration Envoy rejects is sent once, the
// NACK and Envoy's message reach the status, Envoy keeps serving the last
// good configuration, and a later good version is applied.
func TestIntegrationEnvoyNack(t *testing.T) {
	for _, delta := range []bool{false, true} {
		t.Run(map[bool]string{false: "sotw", true: "delta"}[delta], func(t *testing.T) {
			r := newEnvoyRig(t, delta)
			ctx := context.Background()
			in := shopInput(netip.MustParseAddr("127.0.0.1"), int32(r.port))
			good := r.build(t, in)
			if err := r.srv.Update(ctx, r.node, good); err != nil {
				t.Fatal(err)
			}
			r.waitAcked(t, good.Version)

			// Valid RE2 syntax (Lint passes), but a program larger than
			// Envoy's re2.max_program_size.error_level (100): Envoy NACKs.
			// ValidateL7Policy refuses this regex, so the test edits the
			// built resources, standing for any config Envoy rejects.
			badRes := r.build(t, in)
			editRBAC(badRes, func(rb *rbacconfig.RBAC) {
				rb.Policies["shop/api/1"].Permissions[0].GetAndRules().Rules[1].GetUrlPath().GetPath().MatchPattern = &matcher.StringMatcher_SafeRegex{SafeRegex: &matcher.RegexMatcher{Regex: "/orders/[a-z]{300}"}}
			})
			v, err := version(badRes)
			if err != nil {
				t.Fatal(err)
			}
			badRes.Version = v
			if err := Lint(badRes); err != nil {
				t.Fatal(err)
			}
			before := r.srv.Status(r.node).Responses
			if err := r.srv.Update(ctx, r.node, badRes); err != nil {
				t.Fatal(err)
			}
			var st NodeStatus
			envoytest.Eventually(t, 20*time.Second, "envoy nacks", func() error {
				st = r.srv.Status(r.node)
				if st.NackedVersion != badRes.Version {
					return errStatus(st)
				}
				return nil
			})
			time.Sleep(3 * time.Second)
			st = r.srv.Status(r.node)
			t.Logf("NACK message: %s", st.Message)
			t.Logf("responses sent from the bad version's Update until 3 s after its NACK: %d", st.Responses-before)
			if !strings.Contains(st.Message, "regex") {
				t.Errorf("NACK message does not name the regex: %q", st.Message)
			}
			// One response per type carried the bad version (delta: the
			// listener only); plus at most one rollback response per type.
			if n := st.Responses - before; n > 4 {
				t.Errorf("%d responses around one NACK: a resend loop", n)
			}
			if st.AckedVersion != good.Version || st.Programmed() {
				t.Errorf("status after NACK %+v", st)
			}
			// The last good configuration still enforces.
			if code, body := r.do(t, "GET", "/public/ok", nil); code != 200 {
				t.Errorf("allowed request after NACK: %d %s", code, body)
			}
			if code, _ := r.do(t, "GET", "/private", nil); code != 403 {
				t.Errorf("denied request after NACK: %d", code)
			}
			dump, err := r.envoy.AdminGet(ctx, "/config_dump?resource=dynamic_listeners")
			if err != nil {
				t.Fatal(err)
			}
			// SotW versions are ours; delta's per-resource versions are hashes.
			if !delta && (!strings.Contains(dump, good.Version) || strings.Contains(dump, `"version_info": "`+badRes.Version)) {
				t.Errorf("envoy's listener is not at the good version %s", good.Version)
			}

			// A later good version is applied and clears the NACK.
			in.Policies[0].Spec.Rules[0].Path.Prefix = ptr("/pub/")
			next := r.build(t, in)
			if err := r.srv.Update(ctx, r.node, next); err != nil {
				t.Fatal(err)
			}
			r.waitAcked(t, next.Version)
			if st := r.srv.Status(r.node); st.NackedVersion != "" || !st.Programmed() {
				t.Errorf("status after the next good version %+v", st)
			}
			envoytest.Eventually(t, 10*time.Second, "new rule enforced", func() error {
				if code, _ := r.do(t, "GET", "/pub/x", nil); code != 200 {
					return errCode(code)
				}
				return nil
			})
		})
	}
}

type errStatus NodeStatus

func (e errStatus) Error() string {
	return "status " + NodeStatus(e).Node + " acked " + e.AckedVersion + " nacked " + e.NackedVersion
}

type errCode int

func (e errCode) Error() string { return "HTTP " + string(rune('0'+int(e)/100)) + "xx" }
