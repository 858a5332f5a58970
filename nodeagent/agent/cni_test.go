//go:build linux

package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8stesting "k8s.io/client-go/testing"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/cni"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
)

// chainedCNIDirs is a CNI conf and bin dir pair with kebpf-cni chained
// into a bridge conflist, as an agent leaves a node.
func chainedCNIDirs(t *testing.T) *cni.Installer {
	t.Helper()
	root := t.TempDir()
	in := &cni.Installer{ConfDir: filepath.Join(root, "net.d"), BinDir: filepath.Join(root, "bin"),
		PluginBinary: filepath.Join(root, "kebpf-cni-src"), Entry: map[string]any{"socket": "/x.sock"}}
	for _, d := range []string{in.ConfDir, in.BinDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	const list = `{"cniVersion":"0.4.0","name":"k","plugins":[{"type":"bridge"}]}`
	if err := os.WriteFile(filepath.Join(in.ConfDir, "10-k.conflist"), []byte(list), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(in.PluginBinary, []byte("#!/bin/true\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Ensure(); err != nil {
		t.Fatal(err)
	}
	if ok, err := cni.Chained(in.ConfDir); !ok || err != nil {
		t.Fatalf("setup: chained %v, %v", ok, err)
	}
	return in
}

// An agent started with --cni-unchain takes kebpf-cni out of the dirs an
// earlier install chained it into (chaining switched off or moved).
func TestAgentUnchainsEarlierInstallsDirs(t *testing.T) {
	in := chainedCNIDirs(t)

	startAgent(t, Config{Features: []Feature{}, CNI: CNIConfig{Unchain: cni.DirsList{{Conf: in.ConfDir, Bin: in.BinDir}}}})
	deadline := time.Now().Add(10 * time.Second)
	for {
		chained, err := cni.Chained(in.ConfDir)
		_, statErr := os.Stat(filepath.Join(in.BinDir, cni.PluginType))
		if err == nil && !chained && errors.Is(statErr, os.ErrNotExist) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 10s: chained %v (%v), binary stat %v", chained, err, statErr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The agent's CNI socket publishes each decision to its trace: a sandbox
// admitted with the policy feature off is one cni event naming the pod.
func TestAgentCNITraceEvent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "cni.sock")
	a := startAgent(t, Config{Features: []Feature{}, CNI: CNIConfig{Socket: sock}})
	var err error
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err = cni.NewClient(sock).Add(ctx, cni.AddRequest{Namespace: "x", Name: "a", ContainerID: "c1", IPs: []string{"10.244.0.9"}})
		cancel()
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond) // the socket is served once Run started
	}
	if err != nil {
		t.Fatal(err)
	}
	s := a.trace.Subscribe(apiv1.TraceQuery{})
	defer s.Close()
	var evs []apiv1.TraceEvent
	for {
		l, ok := s.Next(context.Background())
		if !ok {
			break
		}
		if l.Event != nil {
			evs = append(evs, *l.Event)
		}
	}
	if len(evs) != 1 || evs[0].Type != apiv1.TraceTypeCNI || evs[0].Verdict != apiv1.TraceVerdictAdmitted ||
		evs[0].Destination != (apiv1.TracePeer{Namespace: "x", Pod: "a", IP: "10.244.0.9"}) || evs[0].Node != "kebpf-node" ||
		!strings.Contains(evs[0].Message, "policy feature is off") {
		t.Fatalf("events %+v, want one admitted cni event for x/a", evs)
	}
}

// TestUnchainOnRemovalOnly: an agent stopping because its DaemonSet or
// namespace is being deleted takes kebpf-cni out (nothing would answer it
// again and the node could start no pod); a restart, or an API it cannot
// read, leaves it chained (no pod starts unprotected meanwhile).
func TestUnchainOnRemovalOnly(t *testing.T) {
	now := metav1.Now()
	ns := func(deleting bool) *corev1.Namespace {
		n := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: manifests.Namespace}}
		if deleting {
			n.DeletionTimestamp = &now
			n.Finalizers = []string{"kubernetes"}
		}
		return n
	}
	ds := func(deleting bool) *appsv1.DaemonSet {
		d := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: manifests.Namespace, Name: manifests.DaemonSetName}}
		if deleting {
			d.DeletionTimestamp = &now
			d.Finalizers = []string{"foregroundDeletion"}
		}
		return d
	}
	for _, tc := range []struct {
		name    string
		objs    []runtime.Object
		apiDown bool
		unchain bool
	}{
		{"restart: DaemonSet and namespace live", []runtime.Object{ns(false), ds(false)}, false, false},
		{"namespace being deleted", []runtime.Object{ns(true), ds(false)}, false, true},
		{"namespace gone", nil, false, true},
		{"DaemonSet being deleted", []runtime.Object{ns(false), ds(true)}, false, true},
		{"DaemonSet gone", []runtime.Object{ns(false)}, false, true},
		{"API unreadable: cannot tell, stays chained", []runtime.Object{ns(true)}, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := chainedCNIDirs(t)
			client := fake.NewClientset(tc.objs...)
			if tc.apiDown {
				client.PrependReactor("get", "*", func(k8stesting.Action) (bool, runtime.Object, error) {
					return true, nil, errors.New("connection refused")
				})
			}
			a := &Agent{cfg: Config{Kube: client, ConfigNamespace: manifests.Namespace, CNI: CNIConfig{ConfDir: in.ConfDir, BinDir: in.BinDir}},
				log: slog.New(slog.NewTextHandler(io.Discard, nil))}
			a.unchainIfRemoved()
			chained, err := cni.Chained(in.ConfDir)
			if err != nil {
				t.Fatal(err)
			}
			if chained == tc.unchain {
				t.Errorf("chained after stop = %v, want %v", chained, !tc.unchain)
			}
		})
	}
}
