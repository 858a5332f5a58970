//go:build linux

package bench

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

const benchToken = "kebpf-bench-admin-token"

// startControlPlane runs etcd and kube-apiserver on 127.0.0.1 inside the
// client netns (ports private to it) with a static admin token and
// AlwaysAllow: the bench measures datapaths, not authorization.
func (e *env) startControlPlane(binDir, etcdBin string) (string, error) {
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPeer)
	if _, err := e.start("etcd", startOpts{netns: e.nsC}, etcdBin,
		"--name", "bench", "--data-dir", filepath.Join(e.dataDir, "etcd"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "bench="+peerURL, "--initial-cluster-state", "new",
		"--quota-backend-bytes", fmt.Sprint(8<<30), "--snapshot-count", "50000",
		"--log-level", "warn"); err != nil {
		return "", err
	}

	pki := filepath.Join(e.dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return "", err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", fmt.Errorf("generate service-account key: %w", err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	pder, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	saKey, saPub := filepath.Join(pki, "sa.key"), filepath.Join(pki, "sa.pub")
	if err := os.WriteFile(saKey, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return "", err
	}
	if err := os.WriteFile(saPub, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pder}), 0o644); err != nil {
		return "", err
	}
	tokens := filepath.Join(pki, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(benchToken+",bench-admin,bench-admin,system:masters\n"), 0o600); err != nil {
		return "", err
	}
	if _, err := e.start("kube-apiserver", startOpts{netns: e.nsC}, filepath.Join(binDir, "kube-apiserver"),
		"--etcd-servers", etcdURL,
		"--bind-address", "127.0.0.1", "--secure-port", fmt.Sprint(apiPort),
		// Never loopback (the API server refuses it); the address exists only
		// inside our netns.
		"--advertise-address", clientIP,
		"--service-cluster-ip-range", serviceCIDR,
		"--cert-dir", filepath.Join(e.dir, "apiserver-certs"),
		"--token-auth-file", tokens,
		"--authorization-mode", "AlwaysAllow",
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", saPub, "--service-account-signing-key-file", saKey,
		"--enable-priority-and-fairness=false",
		"--max-requests-inflight", "4000", "--max-mutating-requests-inflight", "2000",
		"--profiling=false", "--enable-garbage-collector=false", "--v=0"); err != nil {
		return "", err
	}

	kubeconfig := filepath.Join(e.dir, "kubeconfig")
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: bench
  cluster:
    server: https://127.0.0.1:%d
    insecure-skip-tls-verify: true
users:
- name: bench
  user:
    token: %s
contexts:
- name: bench
  context: {cluster: bench, user: bench}
current-context: bench
`, apiPort, benchToken)
	if err := os.WriteFile(kubeconfig, []byte(kc), 0o600); err != nil {
		return "", err
	}
	return kubeconfig, nil
}

// apiClient builds a client for the bench API server. The harness itself
// runs in the host netns; its sockets are made inside the client netns (see
// dialInNetns), so 127.0.0.1 is the API server's loopback, not the host's.
func (e *env) apiClient(qps float32) (kubernetes.Interface, error) {
	cfg, err := clientcmd.BuildConfigFromFlags(fmt.Sprintf("https://127.0.0.1:%d", apiPort), "")
	if err != nil {
		return nil, err
	}
	cfg.Dial = e.dialInNetns
	cfg.BearerToken = benchToken
	cfg.TLSClientConfig.Insecure = true
	cfg.QPS, cfg.Burst = qps, int(qps)
	cfg.Timeout = 60 * time.Second
	return kubernetes.NewForConfig(cfg)
}

func waitReady(ctx context.Context, c kubernetes.Interface, timeout time.Duration, exited func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if err := exited(); err != nil {
			return err
		}
		b, err := c.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil && string(b) == "ok" {
			return nil
		}
		last = err
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	return fmt.Errorf("kube-apiserver not ready after %s: %v", timeout, last)
}

// createNode gives kube-proxy and the agent a Node to read their node IP from.
func createNode(ctx context.Context, c kubernetes.Interface) error {
	n, err := c.CoreV1().Nodes().Create(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName,
		Labels: map[string]string{"kubernetes.io/hostname": nodeName}}}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create node: %w", err)
	}
	n.Status.Addresses = []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: clientIP}, {Type: v1.NodeHostName, Address: nodeName}}
	if _, err := c.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("update node status: %w", err)
	}
	return nil
}
