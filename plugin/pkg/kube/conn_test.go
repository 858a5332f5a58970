package kube_test

import (
	"context"
	"strings"
	"testing"

	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

func TestConnectUsesPresetClients(t *testing.T) {
	f := testutil.NewFake(t, nil)
	conn := kube.Conn{Clients: f.Clients}
	c, v, err := conn.Connect(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if c != f.Clients || v == nil {
		t.Errorf("Connect = %p, %v; want the preset clients and a server version", c, v)
	}
}

func TestConnectBadKubeconfig(t *testing.T) {
	conn := kube.Conn{Flags: testutil.Flags(t, "/nonexistent/kubeconfig")}
	_, _, err := conn.Connect(context.Background())
	if err == nil || !strings.Contains(err.Error(), "load kubeconfig") {
		t.Errorf("err = %v, want a kubeconfig error", err)
	}
	if conn.Clients != nil {
		t.Error("clients built from a bad kubeconfig")
	}
}
