package local

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/images"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/k8sbin"
)

const (
	// DNSServiceIP is the kube-dns Service's ClusterIP and the kubelet's
	// clusterDNS: the 10th address of ServiceCIDR, as kubeadm picks it.
	DNSServiceIP = "10.96.0.10"
	// ClusterDomain is the kubelet's clusterDomain, the zone CoreDNS serves.
	ClusterDomain = "cluster.local"
	// CoreDNSImage is the image built from the CoreDNS binary of
	// kindtests/corednsbuild, imported into containerd and never pulled.
	CoreDNSImage = "localhost/kubectl-ebpf/coredns:" + k8sbin.CoreDNSVersion

	dnsNamespace = "kube-system"
	dnsName      = "coredns"
	dnsReadyPort = 8181
	// dnsReadyTimeout bounds the wait for the CoreDNS pod: a started
	// container plus the kubernetes plugin's first list, seconds when healthy.
	dnsReadyTimeout = 2 * time.Minute
)

// dnsLabels select the CoreDNS pods; k8s-app=kube-dns is the label every
// distribution (and upstream's own tests) looks the cluster DNS up by.
var dnsLabels = map[string]string{"k8s-app": "kube-dns"}

// corefile answers only what the cluster owns. The VM has no way out, so
// there is no `forward`: any other name gets REFUSED at once (no server block
// matches), where a forward to an unreachable upstream would make every
// lookup of an outside name hang until the client's timeout.
var corefile = fmt.Sprintf(`%[1]s:53 in-addr.arpa:53 ip6.arpa:53 {
    errors
    ready :%[2]d
    kubernetes %[1]s in-addr.arpa ip6.arpa {
        pods insecure
        ttl 30
    }
    cache 30
    loadbalance
}
`, ClusterDomain, dnsReadyPort)

func coreDNSTarball() string {
	return filepath.Join(cluster.CacheDir(), "images", "coredns-"+k8sbin.CoreDNSVersion+".tar")
}

// ensureCoreDNSImage imports the CoreDNS image unless containerd has it,
// building the tarball from bin first when it is missing or older than bin.
func (s *state) ensureCoreDNSImage(ctx context.Context, n node, bin string) error {
	out, err := s.ctrOut(ctx, n, "images", "ls", "-q")
	if err == nil && containsLine(string(out), CoreDNSImage) {
		return nil
	}
	tarPath := coreDNSTarball()
	if stale(tarPath, bin) {
		if err := os.MkdirAll(filepath.Dir(tarPath), 0o755); err != nil {
			return err
		}
		if err := images.BuildBinaryImage(ctx, CoreDNSImage, map[string]string{"/coredns": bin}, []string{"/coredns"}, tarPath); err != nil {
			return fmt.Errorf("image %s: %w", CoreDNSImage, err)
		}
	}
	return s.importImage(ctx, n, tarPath)
}

// stale reports whether out is missing or older than in.
func stale(out, in string) bool {
	o, err := os.Stat(out)
	if err != nil {
		return true
	}
	i, err := os.Stat(in)
	return err != nil || i.ModTime().After(o.ModTime())
}

// dnsObjects are the cluster DNS's API objects, in creation order.
func dnsObjects() (*corev1.ServiceAccount, *rbacv1.ClusterRole, *rbacv1.ClusterRoleBinding, *corev1.ConfigMap, *appsv1.Deployment, *corev1.Service) {
	meta := metav1.ObjectMeta{Name: dnsName, Namespace: dnsNamespace, Labels: dnsLabels}
	clusterMeta := metav1.ObjectMeta{Name: "system:coredns", Labels: dnsLabels}
	sa := &corev1.ServiceAccount{ObjectMeta: meta}
	// What the kubernetes plugin lists and watches (pods: `pods insecure`
	// needs none, but CoreDNS's own manifest grants it and `pods verified`
	// would).
	role := &rbacv1.ClusterRole{ObjectMeta: clusterMeta, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"services", "pods", "namespaces"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch"}},
	}}
	binding := &rbacv1.ClusterRoleBinding{ObjectMeta: clusterMeta,
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: clusterMeta.Name},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: dnsName, Namespace: dnsNamespace}},
	}
	cm := &corev1.ConfigMap{ObjectMeta: meta, Data: map[string]string{"Corefile": corefile}}
	dep := &appsv1.Deployment{ObjectMeta: meta, Spec: appsv1.DeploymentSpec{
		Replicas: ptr.To[int32](1),
		Selector: &metav1.LabelSelector{MatchLabels: dnsLabels},
		Template: corev1.PodTemplateSpec{
			ObjectMeta: metav1.ObjectMeta{Labels: dnsLabels},
			Spec: corev1.PodSpec{
				ServiceAccountName: dnsName,
				PriorityClassName:  "system-cluster-critical",
				// The node's resolver, never the cluster DNS itself.
				DNSPolicy:                     corev1.DNSDefault,
				TerminationGracePeriodSeconds: ptr.To[int64](5),
				Containers: []corev1.Container{{
					Name:            "coredns",
					Image:           CoreDNSImage,
					ImagePullPolicy: corev1.PullNever,
					Args:            []string{"-conf", "/etc/coredns/Corefile"},
					// The API server directly, not through the kubernetes
					// Service: DNS must come up and keep working while no
					// Service datapath runs (kube-proxy off and the product
					// not installed yet, or being uninstalled), as a
					// kube-proxy-free cluster's bootstrap components do.
					Env: []corev1.EnvVar{
						{Name: "KUBERNETES_SERVICE_HOST", Value: APIServerIP},
						{Name: "KUBERNETES_SERVICE_PORT", Value: fmt.Sprint(APIPort)},
					},
					Ports: []corev1.ContainerPort{
						{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP},
						{Name: "dns-tcp", ContainerPort: 53, Protocol: corev1.ProtocolTCP},
					},
					// The ready plugin answers 200 once the kubernetes plugin
					// has synced its caches: before that it would answer
					// NXDOMAIN for names that exist.
					ReadinessProbe: &corev1.Probe{
						ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(dnsReadyPort)}},
						PeriodSeconds: 1, FailureThreshold: 3,
					},
					VolumeMounts: []corev1.VolumeMount{{Name: "config", MountPath: "/etc/coredns", ReadOnly: true}},
				}},
				Volumes: []corev1.Volume{{Name: "config", VolumeSource: corev1.VolumeSource{
					ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: dnsName}},
				}}},
			},
		},
	}}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "kube-dns", Namespace: dnsNamespace, Labels: dnsLabels},
		Spec: corev1.ServiceSpec{
			Selector:  dnsLabels,
			ClusterIP: DNSServiceIP,
			Ports: []corev1.ServicePort{
				{Name: "dns", Port: 53, TargetPort: intstr.FromString("dns"), Protocol: corev1.ProtocolUDP},
				{Name: "dns-tcp", Port: 53, TargetPort: intstr.FromString("dns-tcp"), Protocol: corev1.ProtocolTCP},
			},
		},
	}
	return sa, role, binding, cm, dep, svc
}

// upsert creates an object, or replaces the one of that name (keeping its
// resourceVersion, and what keep copies from it), so a re-run `up`
// converges instead of failing. It looks first: creating a Service whose
// fixed ClusterIP is taken fails on the IP, not as AlreadyExists.
func upsert[T metav1.Object](ctx context.Context, obj T, create func(context.Context, T, metav1.CreateOptions) (T, error),
	get func(context.Context, string, metav1.GetOptions) (T, error), update func(context.Context, T, metav1.UpdateOptions) (T, error),
	keep func(cur, obj T)) error {
	cur, err := get(ctx, obj.GetName(), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = create(ctx, obj, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	obj.SetResourceVersion(cur.GetResourceVersion())
	if keep != nil {
		keep(cur, obj)
	}
	_, err = update(ctx, obj, metav1.UpdateOptions{})
	return err
}

// deployDNS creates (or updates) the cluster DNS's objects.
func deployDNS(ctx context.Context, cs kubernetes.Interface) error {
	sa, role, binding, cm, dep, svc := dnsObjects()
	core, rbac := cs.CoreV1(), cs.RbacV1()
	steps := []struct {
		what string
		do   func() error
	}{
		{"ServiceAccount", func() error {
			c := core.ServiceAccounts(dnsNamespace)
			return upsert(ctx, sa, c.Create, c.Get, c.Update, nil)
		}},
		{"ClusterRole", func() error { c := rbac.ClusterRoles(); return upsert(ctx, role, c.Create, c.Get, c.Update, nil) }},
		{"ClusterRoleBinding", func() error {
			c := rbac.ClusterRoleBindings()
			return upsert(ctx, binding, c.Create, c.Get, c.Update, nil)
		}},
		{"ConfigMap", func() error {
			c := core.ConfigMaps(dnsNamespace)
			return upsert(ctx, cm, c.Create, c.Get, c.Update, nil)
		}},
		{"Deployment", func() error {
			c := cs.AppsV1().Deployments(dnsNamespace)
			return upsert(ctx, dep, c.Create, c.Get, c.Update, nil)
		}},
		{"Service", func() error {
			c := core.Services(dnsNamespace)
			// Fields the API server defaulted: an update without them
			// reads as a request for a new ClusterIP, which is taken.
			return upsert(ctx, svc, c.Create, c.Get, c.Update, func(cur, obj *corev1.Service) {
				obj.Spec.ClusterIPs, obj.Spec.IPFamilies, obj.Spec.IPFamilyPolicy = cur.Spec.ClusterIPs, cur.Spec.IPFamilies, cur.Spec.IPFamilyPolicy
			})
		}},
	}
	for _, st := range steps {
		if err := st.do(); err != nil {
			return fmt.Errorf("cluster DNS: %s: %w", st.what, err)
		}
	}
	return nil
}

// dnsReady passes once the CoreDNS Deployment has a Ready replica; else its
// error says why, from the pod's own status (ErrImageNeverPull, CrashLoop...).
func dnsReady(ctx context.Context, cs kubernetes.Interface) error {
	d, err := cs.AppsV1().Deployments(dnsNamespace).Get(ctx, dnsName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if d.Status.ObservedGeneration >= d.Generation && d.Status.ReadyReplicas >= 1 && d.Status.UpdatedReplicas >= 1 {
		return nil
	}
	pods, err := cs.CoreV1().Pods(dnsNamespace).List(ctx, metav1.ListOptions{LabelSelector: "k8s-app=kube-dns"})
	if err != nil {
		return err
	}
	var why []string
	for _, p := range pods.Items {
		w := fmt.Sprintf("pod %s %s", p.Name, p.Status.Phase)
		for _, c := range p.Status.ContainerStatuses {
			if c.State.Waiting != nil {
				w += fmt.Sprintf(" (%s: %s)", c.State.Waiting.Reason, c.State.Waiting.Message)
			}
			if c.LastTerminationState.Terminated != nil {
				w += fmt.Sprintf(" (last exit %d: %s)", c.LastTerminationState.Terminated.ExitCode, c.LastTerminationState.Terminated.Message)
			}
		}
		why = append(why, w)
	}
	if len(why) == 0 {
		return errors.New("no CoreDNS pod yet")
	}
	return fmt.Errorf("CoreDNS not ready: %s", strings.Join(why, "; "))
}

// ensureDNS deploys the cluster DNS and waits until it answers.
func (s *state) ensureDNS(ctx context.Context, cs kubernetes.Interface) error {
	if err := deployDNS(ctx, cs); err != nil {
		return err
	}
	return s.waitFor(ctx, "CoreDNS Ready", dnsReadyTimeout, func() error {
		for _, n := range s.nodes() {
			if err := s.checkExited(kubeletComponent(n)); err != nil {
				return backoffStop{err}
			}
		}
		return dnsReady(ctx, cs)
	})
}

// reuseDNS makes a running cluster's DNS what Create would deploy.
func (s *state) reuseDNS(ctx context.Context, log io.Writer) error {
	bin, err := k8sbin.EnsureCoreDNS(ctx, log)
	if err != nil {
		return err
	}
	for _, n := range s.nodes() {
		if err := s.ensureCoreDNSImage(ctx, n, bin); err != nil {
			return err
		}
	}
	cs, err := s.clientset()
	if err != nil {
		return err
	}
	return s.ensureDNS(ctx, cs)
}
