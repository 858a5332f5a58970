package status_test

import (
	"encoding/json"
	"errors"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

const l7On = "features:\n  l7: true\n  sockstats: true\n"

// l7Setup is a one-node cluster with l7 configured changedAgo before now.
type l7Setup struct {
	l7         *apiv1.L7NodeStatus // the agent's report; nil: none
	noEnvoyDS  bool                // the Envoy DaemonSet is missing
	envoyPod   *corev1.PodStatus   // nil: no Envoy pod
	changedAgo time.Duration
}

func (s l7Setup) fake(t *testing.T) *testutil.Fake {
	t.Helper()
	kubeObjs := oneNode(l7On, s.changedAgo)
	if !s.noEnvoyDS {
		kubeObjs = append(kubeObjs, &appsv1.DaemonSet{
			ObjectMeta: metav1.ObjectMeta{Name: manifests.EnvoyDaemonSetName, Namespace: manifests.Namespace, Generation: 1},
			Spec: appsv1.DaemonSetSpec{Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{
				Containers: []corev1.Container{{Name: manifests.EnvoyContainer, Image: manifests.DefaultEnvoyImage}},
			}}},
			Status: appsv1.DaemonSetStatus{ObservedGeneration: 1, DesiredNumberScheduled: 1, NumberReady: 1, UpdatedNumberScheduled: 1},
		})
	}
	if s.envoyPod != nil {
		kubeObjs = append(kubeObjs, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "kebpf-envoy-xyz", Namespace: manifests.Namespace, Labels: map[string]string{manifests.LabelName: manifests.EnvoyDaemonSetName}},
			Spec:       corev1.PodSpec{NodeName: "kebpf-node"},
			Status:     *s.envoyPod,
		})
	}
	st := testutil.NodeState("kebpf-node", apiv1.NodeStateStatus{
		AgentVersion: "dev", Kernel: "6.18.0", Ready: true, Heartbeat: metav1.NewTime(now), Active: []string{"sockstats", "l7"}, L7: s.l7,
	})
	return testutil.NewFake(t, kubeObjs, testutil.CRD(), st)
}

func TestStatusL7(t *testing.T) {
	running := testutil.RunningReady
	notReady := corev1.PodStatus{Phase: corev1.PodRunning, Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionFalse}}}
	acked := &apiv1.L7NodeStatus{EnvoyReady: true, Version: "v3", AckedVersion: "v3", Steered: 2, Policies: 1}
	tests := []struct {
		name    string
		setup   l7Setup
		output  string
		want    string
		wantErr error
	}{
		{name: "Envoy ready", setup: l7Setup{l7: acked, envoyPod: &running, changedAgo: time.Hour},
			want: "NODE         READY   VERSION   KERNEL   ACTIVE         ENVOY   ACKED   ERRORS\n" +
				"kebpf-node   true    dev       6.18.0   sockstats,l7   ready   v3      -\n"},
		{name: "wide names the Envoy pod", setup: l7Setup{l7: acked, envoyPod: &running, changedAgo: time.Hour}, output: "wide",
			want: "NODE         READY   VERSION   KERNEL   ACTIVE         ENVOY   ACKED   ERRORS   FEATURES   POD               ENVOY-POD\n" +
				"kebpf-node   true    dev       6.18.0   sockstats,l7   ready   v3      -        -          kebpf-agent-abc   kebpf-envoy-xyz\n"},
		{name: "Envoy just created: not ready yet, still healthy", setup: l7Setup{l7: &apiv1.L7NodeStatus{Version: "v1"}, envoyPod: &notReady, changedAgo: 10 * time.Second},
			want: "NODE         READY   VERSION   KERNEL   ACTIVE         ENVOY       ACKED   ERRORS\n" +
				"kebpf-node   true    dev       6.18.0   sockstats,l7   not ready   -       -\n"},
		{name: "Envoy not ready long after the change", setup: l7Setup{l7: &apiv1.L7NodeStatus{Version: "v1"}, envoyPod: &notReady, changedAgo: time.Hour},
			want: "NODE         READY   VERSION   KERNEL   ACTIVE         ENVOY       ACKED   ERRORS\n" +
				"kebpf-node   false   dev       6.18.0   sockstats,l7   not ready   -       Envoy not ready (Envoy pod Running, not ready)\n",
			wantErr: cmdutil.ErrUnhealthy},
		{name: "Envoy runs but has not ACKed the agent's version", setup: l7Setup{l7: &apiv1.L7NodeStatus{Version: "v2", AckedVersion: "v1"}, envoyPod: &running, changedAgo: time.Hour},
			want: "NODE         READY   VERSION   KERNEL   ACTIVE         ENVOY       ACKED   ERRORS\n" +
				"kebpf-node   false   dev       6.18.0   sockstats,l7   not ready   v1      Envoy not ready (xDS version v2 not ACKed)\n",
			wantErr: cmdutil.ErrUnhealthy},
		{name: "no Envoy pod, no report from the agent", setup: l7Setup{changedAgo: time.Hour},
			want: "NODE         READY   VERSION   KERNEL   ACTIVE         ENVOY   ACKED   ERRORS\n" +
				"kebpf-node   false   dev       6.18.0   sockstats,l7   -       -       Envoy not ready (no Envoy pod)\n",
			wantErr: cmdutil.ErrUnhealthy},
		{name: "a rejected version is an error, Envoy runs the ACKed one",
			setup: l7Setup{l7: &apiv1.L7NodeStatus{EnvoyReady: true, Version: "v3", AckedVersion: "v3", NackedVersion: "v4", NackMessage: "invalid regex"}, envoyPod: &running, changedAgo: time.Hour},
			want: "NODE         READY   VERSION   KERNEL   ACTIVE         ENVOY   ACKED   ERRORS\n" +
				"kebpf-node   true    dev       6.18.0   sockstats,l7   ready   v3      Envoy rejected xDS version v4: invalid regex\n"},
		{name: "Envoy DaemonSet missing", setup: l7Setup{l7: acked, noEnvoyDS: true, changedAgo: time.Hour},
			want: "NODE         READY   VERSION   KERNEL   ACTIVE         ENVOY   ACKED   ERRORS\n" +
				"kebpf-node   true    dev       6.18.0   sockstats,l7   ready   v3      -\n" +
				"envoy: l7 is enabled but DaemonSet kebpf-envoy does not exist: run \"kubectl ebpf enable l7\"\n",
			wantErr: cmdutil.ErrUnhealthy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := run(t, tt.setup.fake(t), tt.output)
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("err = %v, want %v", err, tt.wantErr)
			}
			if out != tt.want {
				t.Errorf("output:\n%s\nwant:\n%s", out, tt.want)
			}
		})
	}
}

func TestStatusL7JSON(t *testing.T) {
	running := testutil.RunningReady
	s := l7Setup{l7: &apiv1.L7NodeStatus{EnvoyReady: true, Version: "v3", AckedVersion: "v3", Steered: 2, Policies: 1}, envoyPod: &running, changedAgo: time.Hour}
	out, err := run(t, s.fake(t), "json")
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Envoy map[string]any `json:"envoy"`
		Nodes []struct {
			L7       map[string]any `json:"l7"`
			EnvoyPod string         `json:"envoyPod"`
		} `json:"nodes"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil || len(got.Nodes) != 1 {
		t.Fatalf("json %q: %v", out, err)
	}
	envoy, _ := json.Marshal(got.Envoy)
	l7, _ := json.Marshal(got.Nodes[0].L7)
	if want := `{"desired":1,"image":"docker.io/envoyproxy/envoy:v1.40.0","name":"kebpf-envoy","ready":1,"updated":1}`; string(envoy) != want {
		t.Errorf("envoy %s, want %s", envoy, want)
	}
	if want := `{"ackedVersion":"v3","envoyReady":true,"policies":1,"steered":2,"version":"v3"}`; string(l7) != want {
		t.Errorf("nodes[0].l7 %s, want %s", l7, want)
	}
	if got.Nodes[0].EnvoyPod != "kebpf-envoy-xyz" {
		t.Errorf("envoyPod %q", got.Nodes[0].EnvoyPod)
	}
}
