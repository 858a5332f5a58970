//go:build linux

package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/netpol"
)

// nsDatapath runs the datapath's writes inside the node netns: tcx attaches
// by ifindex in the calling thread's netns (the real agent is hostNetwork).
type nsDatapath struct {
	objs *dp.Objects
	ns   string
}

func (d nsDatapath) do(fn func() error) error { return netnsutil.Do(netnsutil.Path(d.ns), fn) }
func (d nsDatapath) ApplyEndpoint(p dp.EndpointPolicy) error {
	return d.do(func() error { return d.objs.ApplyEndpoint(p) })
}
func (d nsDatapath) DeleteEndpoint(id uint32) error {
	return d.do(func() error { return d.objs.DeleteEndpoint(id) })
}
func (d nsDatapath) SetHostIPs(ips []netip.Addr) error {
	return d.do(func() error { return d.objs.SetHostIPs(ips) })
}

// ifaceMap: the host-side veth of each pod IP.
type ifaceMap map[netip.Addr]int

func (m ifaceMap) IfIndex(ips []netip.Addr) (int, error) {
	for _, ip := range ips {
		if i, ok := m[ip]; ok {
			return i, nil
		}
	}
	return 0, nil
}

type explainPod struct {
	ns, name, app string
	k             int // subnet 10.127.0.16k/28: node .16k+1, pod .16k+2
	ports         []corev1.ContainerPort
}

func (p explainPod) ip() string     { return fmt.Sprintf("10.127.0.%d", 16*p.k+2) }
func (p explainPod) nodeIP() string { return fmt.Sprintf("10.127.0.%d", 16*p.k+1) }

// TestExplainAgreesWithDatapath: pods in netns behind veths on a "node"
// netns, the agent's real policy sync compiling NetworkPolicies from the
// (fake) API into the real datapath, real TCP and UDP between every pair;
// /explain on the agent's loopback server gives each pair the verdict the
// packets got, naming the policies.
func TestExplainAgreesWithDatapath(t *testing.T) {
	bpftest.RequireRoot(t)
	const node = "kebpf-explain"
	pods := []explainPod{
		{ns: "web", name: "client", app: "client", k: 1},
		{ns: "web", name: "other", app: "other", k: 2},
		{ns: "shop", name: "server", app: "server", k: 3, ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}}},
		{ns: "shop", name: "db", app: "db", k: 4},
	}
	n := bpftest.Netns(t, "kebpf-ex-n")
	podNS := map[string]string{}
	ifaces := ifaceMap{}
	var nodeIPs []netip.Addr
	for _, p := range pods {
		pn := bpftest.Netns(t, "kebpf-ex-"+p.name)
		podNS[p.name] = pn
		host := "vx" + p.name
		for _, c := range [][]string{
			{"ip", "-n", n, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", pn},
			{"ip", "-n", n, "addr", "add", p.nodeIP() + "/28", "dev", host},
			{"ip", "-n", pn, "addr", "add", p.ip() + "/28", "dev", "eth0"},
			{"ip", "-n", n, "link", "set", host, "up"},
			{"ip", "-n", pn, "link", "set", "eth0", "up"},
			{"ip", "-n", pn, "link", "set", "lo", "up"},
			{"ip", "-n", pn, "route", "add", "default", "via", p.nodeIP()},
		} {
			sh(t, c...)
		}
		if err := netnsutil.Do(netnsutil.Path(n), func() error {
			l, err := net.InterfaceByName(host)
			if err == nil {
				ifaces[netip.MustParseAddr(p.ip())] = l.Index
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
		nodeIPs = append(nodeIPs, netip.MustParseAddr(p.nodeIP()))
	}
	sh(t, "ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1")

	// Listeners in every pod: TCP 80 and 8080, UDP 53 (answers, so the
	// sender sees delivery).
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	for _, p := range pods {
		if err := netnsutil.Do(netnsutil.Path(podNS[p.name]), func() error {
			for _, port := range []string{"80", "8080"} {
				ln, err := net.Listen("tcp", net.JoinHostPort(p.ip(), port))
				if err != nil {
					return err
				}
				t.Cleanup(func() { ln.Close() })
				go func() {
					for {
						c, err := ln.Accept()
						if err != nil {
							return
						}
						c.Close()
					}
				}()
			}
			pc, err := net.ListenPacket("udp", net.JoinHostPort(p.ip(), "53"))
			if err != nil {
				return err
			}
			t.Cleanup(func() { pc.Close() })
			go func() {
				buf := make([]byte, 64)
				for {
					n, from, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					pc.WriteTo(buf[:n], from)
				}
			}()
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}

	// The API: namespaces, pods on this node (and one elsewhere), policies.
	var objs []runtime.Object
	for _, ns := range []string{"web", "shop"} {
		objs = append(objs, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"kubernetes.io/metadata.name": ns}}})
	}
	mkPod := func(ns, name, app, nodeName, ip string, ports []corev1.ContainerPort) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + ns + "-" + name), Labels: map[string]string{"app": app}},
			Spec:       corev1.PodSpec{NodeName: nodeName, Containers: []corev1.Container{{Name: "c", Ports: ports}}},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}},
		}
	}
	for _, p := range pods {
		objs = append(objs, mkPod(p.ns, p.name, p.app, node, p.ip(), p.ports))
	}
	objs = append(objs, mkPod("web", "remote", "client", "other-node", "10.128.0.2", nil))
	tcp, udp := corev1.ProtocolTCP, corev1.ProtocolUDP
	httpPort := intstr.FromString("http")
	dns := intstr.FromInt32(53)
	sel := func(app string) metav1.LabelSelector {
		return metav1.LabelSelector{MatchLabels: map[string]string{"app": app}}
	}
	objs = append(objs,
		// Every shop pod: ingress default deny.
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "default-deny"},
			Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}}},
		// server: web's client pods on the named port http (8080).
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "allow-client"},
			Spec: networkingv1.NetworkPolicySpec{PodSelector: sel("server"), Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{
					NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": "web"}},
					PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &httpPort}},
			}}}},
		// db: UDP 53 from 10.127.0.0/24 except other's /28.
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "allow-dns"},
			Spec: networkingv1.NetworkPolicySpec{PodSelector: sel("db"), Ingress: []networkingv1.NetworkPolicyIngressRule{
				{Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &httpPort}}}, // rule 0: names no port of db: matches nothing
				{From: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.127.0.0/24", Except: []string{"10.127.0.32/28"}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &udp, Port: &dns}}},
			}}},
		// other: egress only to shop on TCP 8080.
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "web", Name: "other-egress"},
			Spec: networkingv1.NetworkPolicySpec{PodSelector: sel("other"), PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
				Egress: []networkingv1.NetworkPolicyEgressRule{{
					To:    []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": "shop"}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: pointer(intstr.FromInt32(8080))}},
				}}}},
	)

	pinDir := bpftest.PinDir(t)
	t.Cleanup(func() { netnsutil.Do(netnsutil.Path(n), func() error { return dp.DetachPinned(pinDir) }) })
	var dobjs *dp.Objects
	if err := netnsutil.Do(netnsutil.Path(n), func() error {
		var err error
		dobjs, err = dp.Load(pinDir, dp.LoadOptions{MaxCT: 4096, MaxVerdicts: 4096, MaxPolicyEntries: 1024, MaxEndpoints: 16})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dobjs.Close() })

	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	s, err := netpol.New(netpol.Options{
		Base:    apisync.Base{Client: fake.NewClientset(objs...), NodeName: node, Recorder: record.NewFakeRecorder(100), Log: log},
		NodeIPs: nodeIPs, Datapath: nsDatapath{dobjs, n}, Interfaces: ifaces,
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ag, err := New(Config{NodeName: node, Listener: ln, Features: []Feature{}, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	f := newPolicyFeature(ag)
	ag.feats = append(ag.feats, &featureState{f: f})
	srv, _, err := ag.serve()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	base := "http://" + ln.Addr().String() + apiv1.ExplainPath + "?"
	q := func(from, to string, port int, proto string) string {
		return base + apiv1.ExplainQuery{From: apiv1.TracePodRef{Namespace: strings.Split(from, "/")[0], Name: strings.Split(from, "/")[1]},
			To: apiv1.TracePodRef{Namespace: strings.Split(to, "/")[0], Name: strings.Split(to, "/")[1]}, Port: uint16(port), Protocol: proto}.Encode()
	}

	// Off: 503, one line.
	if code, body := get(t, q("web/client", "shop/server", 8080, "TCP")); code != 503 || strings.Count(strings.TrimSpace(body), "\n") != 0 {
		t.Errorf("feature off: %d %q", code, body)
	}
	f.mu.Lock()
	f.objs, f.syncer = dobjs, &policyRun{Syncer: s, log: log}
	f.mu.Unlock()
	t.Cleanup(func() {
		f.mu.Lock()
		f.objs, f.syncer = nil, nil
		f.mu.Unlock()
	})
	runDone := make(chan error, 1)
	go func() { runDone <- s.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-runDone })
	waitFor(t, "first full sync", s.Synced)

	// Bad query: 400; neither pod here: 404.
	if code, body := get(t, base+"from=web/client&to=shop&port=80"); code != 400 || !strings.HasPrefix(body, "explain: ") {
		t.Errorf("bad query: %d %q", code, body)
	}
	if code, body := get(t, q("web/remote", "web/remote", 80, "TCP")); code != 404 || strings.Count(strings.TrimSpace(body), "\n") != 0 {
		t.Errorf("remote pods: %d %q", code, body)
	}

	observe := func(from, to explainPod, port int, proto string) bool {
		var ok bool
		netnsutil.Do(netnsutil.Path(podNS[from.name]), func() error {
			addr := net.JoinHostPort(to.ip(), fmt.Sprint(port))
			if proto == "TCP" {
				c, err := net.DialTimeout("tcp", addr, 400*time.Millisecond)
				if err == nil {
					ok = true
					c.Close()
				}
				return nil
			}
			c, err := net.Dial("udp", addr)
			if err != nil {
				return nil
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(400 * time.Millisecond))
			c.Write([]byte("q"))
			buf := make([]byte, 8)
			_, err = c.Read(buf)
			ok = err == nil
			return nil
		})
		return ok
	}
	type probe struct {
		port  int
		proto string
	}
	counts := map[string]int{}
	for _, from := range pods {
		for _, to := range pods {
			if from.name == to.name {
				continue
			}
			for _, pr := range []probe{{8080, "TCP"}, {80, "TCP"}, {53, "UDP"}} {
				name := fmt.Sprintf("%s/%s -> %s/%s %d/%s", from.ns, from.name, to.ns, to.name, pr.port, pr.proto)
				got := observe(from, to, pr.port, pr.proto)
				code, body := get(t, q(from.ns+"/"+from.name, to.ns+"/"+to.name, pr.port, pr.proto))
				var ex apiv1.PolicyExplanation
				if err := json.Unmarshal([]byte(body), &ex); code != 200 || err != nil {
					t.Errorf("%s: /explain %d %q (%v)", name, code, body, err)
					continue
				}
				want := apiv1.TraceVerdictDenied
				if got {
					want = apiv1.TraceVerdictAllowed
				}
				if ex.Verdict != want || ex.Egress == nil || ex.Ingress == nil {
					t.Errorf("%s: packets %s, /explain %s", name, want, body)
				}
				counts[ex.Verdict]++
				// The rows whose reasons the table was built for.
				switch {
				case from.name == "client" && to.name == "server" && pr.port == 8080:
					checkSide(t, name, ex.Ingress, apiv1.TraceReasonPolicy, "shop/allow-client", 0, []string{"shop/allow-client", "shop/default-deny"})
				case from.name == "client" && to.name == "server":
					checkSide(t, name, ex.Ingress, apiv1.TraceReasonDefaultDeny, "", -1, []string{"shop/allow-client", "shop/default-deny"})
				case to.name == "db" && pr.proto == "UDP" && from.name != "other":
					checkSide(t, name, ex.Ingress, apiv1.TraceReasonPolicy, "shop/allow-dns", 1, []string{"shop/allow-dns", "shop/default-deny"})
				case from.name == "other" && pr.proto == "UDP":
					checkSide(t, name, ex.Egress, apiv1.TraceReasonDefaultDeny, "web/other-egress", -1, []string{"web/other-egress"})
				case to.ns == "web":
					checkSide(t, name, ex.Ingress, apiv1.TraceReasonNotEnforced, "", -1, nil)
				}
			}
		}
	}
	t.Logf("pairs by verdict: %v", counts)
	if counts[apiv1.TraceVerdictAllowed] == 0 || counts[apiv1.TraceVerdictDenied] == 0 {
		t.Errorf("the table needs allowed and denied pairs: %v", counts)
	}

	// Only the local side is answered when the other pod is elsewhere.
	code, body := get(t, q("web/remote", "shop/server", 8080, "TCP"))
	var ex apiv1.PolicyExplanation
	if err := json.Unmarshal([]byte(body), &ex); code != 200 || err != nil || ex.Egress != nil || ex.Ingress == nil ||
		ex.Ingress.Node != node || ex.Ingress.Pod != "shop/server" {
		t.Errorf("remote client: %d %s (%v)", code, body, err)
	}
}

func pointer[T any](v T) *T { return &v }

// checkSide checks a side's reason, deciding policy (namespace/name, "" for
// any) and rule (-1: none), and SelectedBy.
func checkSide(t *testing.T, name string, s *apiv1.PolicyExplanationSide, reason, policy string, rule int, selectedBy []string) {
	t.Helper()
	if s == nil {
		t.Errorf("%s: side missing", name)
		return
	}
	b, _ := json.Marshal(s)
	if s.Reason != reason {
		t.Errorf("%s: reason %s, want %s: %s", name, s.Reason, reason, b)
	}
	if policy != "" && (s.Policy == nil || s.Policy.Namespace+"/"+s.Policy.Name != policy) {
		t.Errorf("%s: policy not %s: %s", name, policy, b)
	}
	if rule >= 0 && (s.Policy == nil || s.Policy.Rule == nil || *s.Policy.Rule != rule) {
		t.Errorf("%s: rule not %d: %s", name, rule, b)
	}
	if rule < 0 && s.Policy != nil && s.Policy.Rule != nil {
		t.Errorf("%s: a rule for a verdict no rule made: %s", name, b)
	}
	if strings.Join(s.SelectedBy, ",") != strings.Join(selectedBy, ",") {
		t.Errorf("%s: selectedBy %v, want %v", name, s.SelectedBy, selectedBy)
	}
}
