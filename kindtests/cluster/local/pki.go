package local

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

type certSpec struct {
	file   string // base name: <file>.crt, <file>.key
	cn     string
	orgs   []string
	server bool
	client bool
	ips    []net.IP
	dns    []string
}

// clientUsers are the kubeconfigs written next to the certs, one per component.
var clientUsers = []certSpec{
	{file: "admin", cn: "kubernetes-admin", orgs: []string{"system:masters"}, client: true},
	{file: "controller-manager", cn: "system:kube-controller-manager", client: true},
	{file: "scheduler", cn: "system:kube-scheduler", client: true},
	{file: "kube-proxy", cn: "system:kube-proxy", client: true},
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	b := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(path, b, mode); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func readCA(dir string) (*x509.Certificate, crypto.Signer, error) {
	cb, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return nil, nil, err
	}
	kb, err := os.ReadFile(filepath.Join(dir, "ca.key"))
	if err != nil {
		return nil, nil, err
	}
	cp, _ := pem.Decode(cb)
	kp, _ := pem.Decode(kb)
	if cp == nil || kp == nil {
		return nil, nil, fmt.Errorf("decode CA in %s", dir)
	}
	cert, err := x509.ParseCertificate(cp.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("parse CA: %w", err)
	}
	key, err := x509.ParseECPrivateKey(kp.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("parse CA key: %w", err)
	}
	return cert, key, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n
}

// ensurePKI creates the CA, serving and client certs and the service-account
// key pair in dir, keeping whatever already exists so a re-run of Create keeps
// the identities etcd data and kubeconfigs were made with.
// kubeletUser is node n's kubelet credential: the Node authorizer and
// NodeRestriction admit each kubelet only for its own node.
func kubeletUser(n node) certSpec {
	return certSpec{file: "kubelet-" + n.Name, cn: "system:node:" + n.Name, orgs: []string{"system:nodes"}, client: true}
}

func ensurePKI(dir string, users []certSpec) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ca.crt")); err != nil {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("generate CA key: %w", err)
		}
		tmpl := &x509.Certificate{
			SerialNumber:          serial(),
			Subject:               pkix.Name{CommonName: "kubectl-ebpf-local-ca"},
			NotBefore:             time.Now().Add(-time.Hour),
			NotAfter:              time.Now().AddDate(10, 0, 0),
			IsCA:                  true,
			BasicConstraintsValid: true,
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			return fmt.Errorf("sign CA: %w", err)
		}
		kder, _ := x509.MarshalECPrivateKey(key)
		if err := writePEM(filepath.Join(dir, "ca.key"), "EC PRIVATE KEY", kder, 0o600); err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, "ca.crt"), "CERTIFICATE", der, 0o644); err != nil {
			return err
		}
	}
	ca, caKey, err := readCA(dir)
	if err != nil {
		return fmt.Errorf("read CA: %w", err)
	}
	specs := append([]certSpec{
		{
			file: "apiserver", cn: "kube-apiserver", server: true,
			ips: []net.IP{net.ParseIP(APIServerIP), net.ParseIP("10.96.0.1"), net.ParseIP("127.0.0.1")},
			dns: []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost"},
		},
		{file: "apiserver-kubelet-client", cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}, client: true},
	}, users...)
	for _, s := range specs {
		if _, err := os.Stat(filepath.Join(dir, s.file+".crt")); err == nil {
			continue
		}
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("generate key %s: %w", s.file, err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial(),
			Subject:      pkix.Name{CommonName: s.cn, Organization: s.orgs},
			NotBefore:    time.Now().Add(-time.Hour),
			NotAfter:     time.Now().AddDate(10, 0, 0),
			KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			IPAddresses:  s.ips,
			DNSNames:     s.dns,
		}
		if s.server {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		}
		if s.client {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return fmt.Errorf("sign %s: %w", s.file, err)
		}
		kder, _ := x509.MarshalECPrivateKey(key)
		if err := writePEM(filepath.Join(dir, s.file+".key"), "EC PRIVATE KEY", kder, 0o600); err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, s.file+".crt"), "CERTIFICATE", der, 0o644); err != nil {
			return err
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "sa.key")); err != nil {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return fmt.Errorf("generate service-account key: %w", err)
		}
		pub, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
		if err := writePEM(filepath.Join(dir, "sa.pub"), "PUBLIC KEY", pub, 0o644); err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, "sa.key"), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key), 0o600); err != nil {
			return err
		}
	}
	return nil
}

// writeKubeconfig writes a kubeconfig for user (a clientUsers file name) with
// the certs embedded, so the file works when copied elsewhere.
func writeKubeconfig(pkiDir, path, user string) error {
	read := func(n string) (string, error) {
		b, err := os.ReadFile(filepath.Join(pkiDir, n))
		if err != nil {
			return "", err
		}
		return base64.StdEncoding.EncodeToString(b), nil
	}
	ca, err := read("ca.crt")
	if err != nil {
		return fmt.Errorf("kubeconfig %s: %w", user, err)
	}
	crt, err := read(user + ".crt")
	if err != nil {
		return fmt.Errorf("kubeconfig %s: %w", user, err)
	}
	key, err := read(user + ".key")
	if err != nil {
		return fmt.Errorf("kubeconfig %s: %w", user, err)
	}
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kebpf-local
  cluster:
    server: https://%s:%d
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: kebpf-local
  context:
    cluster: kebpf-local
    user: %s
current-context: kebpf-local
`, APIServerIP, APIPort, ca, user, crt, key, user)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
