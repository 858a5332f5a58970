package feature_test

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

func getConfig(t *testing.T, c *kube.Clients) (*corev1.ConfigMap, apiv1.AgentConfig) {
	t.Helper()
	cm, err := c.Kube.CoreV1().ConfigMaps(manifests.Namespace).Get(context.Background(), manifests.ConfigMapName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Strict, as the agent reads it: what we write must be a valid config.
	cfg, err := apiv1.ParseConfig([]byte(cm.Data[apiv1.ConfigKey]))
	if err != nil {
		t.Fatalf("agent would reject the config: %v", err)
	}
	return cm, cfg
}

func wantFeatures(t *testing.T, cfg apiv1.AgentConfig, want map[string]bool) {
	t.Helper()
	for _, f := range apiv1.KnownFeatures {
		if cfg.Enabled(f) != want[f] {
			t.Errorf("feature %s enabled = %v, want %v (config %v)", f, cfg.Enabled(f), want[f], cfg.Features)
		}
	}
}

func install(t *testing.T, flags *genericclioptions.ConfigFlags, extra ...string) testutil.Result {
	t.Helper()
	r := testutil.Run(t, flags, append([]string{"install", "--image", testutil.Image()}, extra...)...)
	if r.Code != 0 {
		t.Fatalf("install: %s", r)
	}
	return r
}

func TestIntegrationEnableDisableChangeOnlyTheirFeature(t *testing.T) {
	kc, flags := testutil.Cluster(t)
	c := testutil.Clients(t, kc)
	install(t, flags)
	before, cfg := getConfig(t, c)
	wantFeatures(t, cfg, map[string]bool{"sockstats": true, "service-lb": true, "policy": true})

	// Leave the test with only the two features it switches.
	if r := testutil.Run(t, flags, "disable", "policy"); r.Code != 0 {
		t.Fatalf("disable policy: %s", r)
	}
	before, _ = getConfig(t, c)

	r := testutil.Run(t, flags, "disable", "service-lb")
	if r.Code != 0 || r.Stdout != "feature service-lb disabled\n" {
		t.Fatalf("disable service-lb: %s", r)
	}
	after, cfg := getConfig(t, c)
	wantFeatures(t, cfg, map[string]bool{"sockstats": true, "service-lb": false})
	for k, v := range before.Labels {
		if after.Labels[k] != v {
			t.Errorf("label %s = %q after disable, want %q", k, after.Labels[k], v)
		}
	}

	// Already disabled: no write at all.
	r = testutil.Run(t, flags, "disable", "service-lb")
	if r.Code != 0 || !strings.Contains(r.Stdout, "already disabled") {
		t.Fatalf("second disable: %s", r)
	}
	again, _ := getConfig(t, c)
	if again.ResourceVersion != after.ResourceVersion {
		t.Errorf("no-op disable wrote the ConfigMap: resourceVersion %s -> %s", after.ResourceVersion, again.ResourceVersion)
	}

	r = testutil.Run(t, flags, "disable", "sockstats")
	if r.Code != 0 {
		t.Fatalf("disable sockstats: %s", r)
	}
	_, cfg = getConfig(t, c)
	wantFeatures(t, cfg, map[string]bool{})

	r = testutil.Run(t, flags, "enable", "service-lb")
	if r.Code != 0 || r.Stdout != "feature service-lb enabled\n" {
		t.Fatalf("enable service-lb: %s", r)
	}
	_, cfg = getConfig(t, c)
	wantFeatures(t, cfg, map[string]bool{"service-lb": true})

	// status reports what is configured, whatever the agents do.
	r = testutil.Run(t, flags, "status", "-o", "json")
	var st struct {
		Configured []string `json:"configured"`
	}
	if err := json.Unmarshal([]byte(r.Stdout), &st); err != nil || strings.Join(st.Configured, ",") != "service-lb" {
		t.Errorf("status -o json configured = %v (%v), want [service-lb]", st.Configured, err)
	}
}

func TestIntegrationUnknownFeatureChangesNothing(t *testing.T) {
	kc, flags := testutil.Cluster(t)
	c := testutil.Clients(t, kc)
	install(t, flags)
	before, _ := getConfig(t, c)
	for _, verb := range []string{"enable", "disable"} {
		r := testutil.Run(t, flags, verb, "sockstat")
		if r.Code == 0 {
			t.Fatalf("%s sockstat succeeded: %s", verb, r)
		}
		if line := testutil.OneLine(t, r.Stderr); line != `error: unknown feature "sockstat": known features are sockstats, service-lb, policy, l7` {
			t.Errorf("stderr = %q", line)
		}
	}
	after, _ := getConfig(t, c)
	if after.ResourceVersion != before.ResourceVersion {
		t.Errorf("ConfigMap changed: resourceVersion %s -> %s", before.ResourceVersion, after.ResourceVersion)
	}
}

func TestIntegrationEnableNotInstalled(t *testing.T) {
	_, flags := testutil.Cluster(t)
	r := testutil.Run(t, flags, "enable", "service-lb")
	if r.Code == 0 {
		t.Fatalf("enable before install succeeded: %s", r)
	}
	want := `error: kubectl-ebpf is not installed (no ConfigMap kubectl-ebpf-system/kubectl-ebpf-config): run "kubectl ebpf install"`
	if line := testutil.OneLine(t, r.Stderr); line != want {
		t.Errorf("stderr = %q\nwant     %q", line, want)
	}
}

func TestIntegrationInstallAfterDisableKeepsIt(t *testing.T) {
	kc, flags := testutil.Cluster(t)
	c := testutil.Clients(t, kc)
	install(t, flags)
	if r := testutil.Run(t, flags, "disable", "service-lb"); r.Code != 0 {
		t.Fatalf("disable: %s", r)
	}
	before, _ := getConfig(t, c)

	r := install(t, flags)
	if !strings.Contains(r.Stdout, "configmap/kubectl-ebpf-config unchanged") {
		t.Errorf("re-install touched the ConfigMap: %q", r.Stdout)
	}
	after, cfg := getConfig(t, c)
	wantFeatures(t, cfg, map[string]bool{"sockstats": true, "service-lb": false, "policy": true})
	if after.ResourceVersion != before.ResourceVersion {
		t.Errorf("re-install rewrote the ConfigMap: resourceVersion %s -> %s", before.ResourceVersion, after.ResourceVersion)
	}

	// An upgrade (other image) keeps it too, and --enable is the way back.
	// An image no node has: the image check would refuse it, and what is
	// tested here is the config, not the rollout.
	r = testutil.Run(t, flags, "install", "--skip-image-check", "--image", "localhost/kubectl-ebpf/agent:upgrade-test")
	if r.Code != 0 {
		t.Fatalf("upgrade: %s", r)
	}
	_, cfg = getConfig(t, c)
	wantFeatures(t, cfg, map[string]bool{"sockstats": true, "service-lb": false, "policy": true})
	install(t, flags, "--enable", "service-lb", "--disable", "sockstats")
	_, cfg = getConfig(t, c)
	wantFeatures(t, cfg, map[string]bool{"sockstats": false, "service-lb": true, "policy": true})
}

// Two writers switching different features at once must both win: the
// apply carries the resourceVersion it read, so the loser retries.
func TestIntegrationConcurrentSwitchesKeepBoth(t *testing.T) {
	kc, flags := testutil.Cluster(t)
	install(t, flags)
	for round := range 5 {
		on := round%2 == 1
		var wg sync.WaitGroup
		errs := make([]error, len(apiv1.KnownFeatures))
		for i, f := range apiv1.KnownFeatures {
			wg.Go(func() {
				// Separate clients: separate connections, real concurrency.
				_, _, errs[i] = testutil.Clients(t, kc).SetFeature(context.Background(), f, on)
			})
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		_, cfg := getConfig(t, testutil.Clients(t, kc))
		for _, f := range apiv1.KnownFeatures {
			if cfg.Enabled(f) != on {
				t.Errorf("round %d: feature %s = %v, want %v: a concurrent write was lost", round, f, cfg.Enabled(f), on)
			}
		}
	}
}
