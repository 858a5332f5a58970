package trace

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/cni"
)

// cniAgent stands in for the agent's policy feature: pod x/slow is
// programmed after 30 ms, any other pod is refused.
type cniAgent struct{}

func (cniAgent) Admit(ctx context.Context, req cni.AddRequest) (cni.AddResponse, error) {
	if req.Name != "slow" {
		return cni.AddResponse{}, cni.Refuse("policy-not-running", errors.New("the policy feature is enabled but not running on node n1 yet"))
	}
	select {
	case <-time.After(30 * time.Millisecond):
	case <-ctx.Done():
		return cni.AddResponse{}, ctx.Err()
	}
	return cni.AddResponse{Enforced: true, Endpoint: 7, Egress: true}, nil
}

func (cniAgent) Release(cni.DelRequest) {}

// history is everything the hub holds.
func history(t *testing.T, h *Hub) []apiv1.TraceEvent {
	t.Helper()
	s := h.Subscribe(apiv1.TraceQuery{})
	defer s.Close()
	var out []apiv1.TraceEvent
	for {
		l, ok := s.Next(context.Background())
		if !ok {
			return out
		}
		if l.Event != nil {
			out = append(out, *l.Event)
		}
	}
}

// The real plugin (Plugin.Add, as skel calls it) asks the agent side over
// the real unix socket; the agent side's decision on each sandbox becomes
// exactly one cni event naming the pod.
func TestCNIEvents(t *testing.T) {
	h, _ := newHub(t, 100, 100)
	sock := filepath.Join(t.TempDir(), "cni.sock")
	ln, err := cni.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	decided := func(d cni.Decision) { h.Publish(CNIEvent(d, "n1", time.Now())) }
	srv := &http.Server{Handler: cni.Handler(cniAgent{}, slog.New(slog.NewTextHandler(io.Discard, nil)), decided)}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	add := func(name, ip string) error {
		conf, _ := json.Marshal(map[string]any{"cniVersion": "1.0.0", "name": "kebpf", "type": cni.PluginType, "socket": sock,
			"prevResult": map[string]any{"cniVersion": "1.0.0", "ips": []map[string]any{{"address": ip + "/24"}, {"address": "fd00::7/64"}}}})
		var out bytes.Buffer
		p := &cni.Plugin{Out: &out}
		return p.Add(&skel.CmdArgs{ContainerID: "c-" + name, Netns: "/var/run/netns/cni-" + name, IfName: "eth0",
			Args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=" + name + ";K8S_POD_UID=uid-" + name, StdinData: conf})
	}
	if err := add("slow", "10.244.0.7"); err != nil {
		t.Fatalf("admitted sandbox: %v", err)
	}
	if err := add("early", "10.244.0.8"); err == nil || !strings.Contains(err.Error(), "not running") {
		t.Fatalf("refused sandbox: plugin returned %v", err)
	}

	evs := history(t, h)
	if len(evs) != 2 {
		t.Fatalf("%d events, want 2: %+v", len(evs), evs)
	}
	adm, ref := evs[0], evs[1]
	wantPeer := apiv1.TracePeer{Namespace: "x", Pod: "slow", IP: "10.244.0.7"}
	if adm.Type != apiv1.TraceTypeCNI || adm.Verdict != apiv1.TraceVerdictAdmitted || adm.Node != "n1" ||
		adm.Destination != wantPeer || adm.Source != wantPeer || adm.Reason != "" {
		t.Errorf("admitted: %+v", adm)
	}
	// "held 30.123ms until endpoint 7 was programmed (...)".
	if !strings.HasPrefix(adm.Message, "held ") || !strings.Contains(adm.Message, "endpoint 7") ||
		!strings.Contains(adm.Message, "fd00::7") {
		t.Errorf("admitted message %q", adm.Message)
	}
	held, err := time.ParseDuration(strings.Fields(adm.Message)[1])
	if err != nil || held < 30*time.Millisecond || held > 10*time.Second {
		t.Errorf("admitted message %q: held %v (%v), want >= the 30ms the agent took", adm.Message, held, err)
	}
	if ref.Type != apiv1.TraceTypeCNI || ref.Verdict != apiv1.TraceVerdictRefused || ref.Reason != "policy-not-running" ||
		ref.Destination.Pod != "early" || ref.Destination.Namespace != "x" || ref.Destination.IP != "10.244.0.8" ||
		ref.Message != "the policy feature is enabled but not running on node n1 yet" {
		t.Errorf("refused: %+v", ref)
	}
	// The filters find them by pod.
	f := apiv1.TraceFilter{ToPods: []apiv1.TracePodRef{{Namespace: "x", Name: "early"}}}
	if f.Match(&adm) || !f.Match(&ref) {
		t.Errorf("--to-pod x/early matches admitted %v, refused %v", f.Match(&adm), f.Match(&ref))
	}
}

func TestRefusalReason(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{cni.Refuse("bad-ip", errors.New("x")), "bad-ip"},
		{errors.Join(errors.New("wrapped"), cni.Refuse("not-synced", errors.New("x"))), "not-synced"},
		{context.Canceled, "canceled"},
		{errors.New("map full"), "refused"},
	} {
		if got := cni.RefusalReason(tc.err); got != tc.want {
			t.Errorf("RefusalReason(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}
