//go:build linux

package bench

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"
)

// svcSet is one family of Services: names <prefix>-<i> in namespace ns, with
// ClusterIPs base+i, each backed by eps endpoints.
type svcSet struct {
	ns     string
	prefix string
	base   netip.Addr
	eps    int
}

var (
	// scale Services: 10.124.0.10 upwards (100k reach 10.125.134.x).
	scaleSet = svcSet{ns: "scale", prefix: "s", base: netip.MustParseAddr("10.124.0.10"), eps: 1}
	// bulk (20k x 5) Services: 10.126.0.10 upwards.
	bulkSet = svcSet{ns: "bulk", prefix: "b", base: netip.MustParseAddr("10.126.0.10"), eps: 5}
	// the churn Service lives apart so its slice is the only thing changing.
	churnSet = svcSet{ns: "churn", prefix: "c", base: netip.MustParseAddr("10.127.255.10"), eps: 1}
)

const svcPort = 80

func (s svcSet) ip(i int) netip.Addr {
	b := s.base.As4()
	v := binary.BigEndian.Uint32(b[:]) + uint32(i)
	binary.BigEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

func (s svcSet) addr(i int) string { return fmt.Sprintf("%s:%d", s.ip(i), svcPort) }

func (s svcSet) name(i int) string { return fmt.Sprintf("%s-%d", s.prefix, i) }

// backendOf spreads Services over the backend addresses so the kernel's
// neighbour and socket tables look like more than one pod.
func backendOf(i, j int) string { return fmt.Sprintf("10.123.0.%d", 2+(i+j)%spreadIPs) }

func benchLabels() map[string]string {
	return map[string]string{"app.kubernetes.io/managed-by": "kubectl-ebpf", "app.kubernetes.io/part-of": "kubectl-ebpf-bench"}
}

func (s svcSet) service(i int) *v1.Service {
	return &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: s.name(i), Namespace: s.ns, Labels: benchLabels()},
		Spec: v1.ServiceSpec{
			Type:      v1.ServiceTypeClusterIP,
			ClusterIP: s.ip(i).String(),
			Ports:     []v1.ServicePort{{Name: "tcp", Protocol: v1.ProtocolTCP, Port: svcPort, TargetPort: intstr.FromInt32(backendPort)}},
		},
	}
}

func (s svcSet) slice(i int, ips ...string) *discovery.EndpointSlice {
	if len(ips) == 0 {
		for j := 0; j < s.eps; j++ {
			ips = append(ips, backendOf(i, j))
		}
	}
	eps := make([]discovery.Endpoint, 0, len(ips))
	for _, ip := range ips {
		eps = append(eps, discovery.Endpoint{Addresses: []string{ip}, Conditions: discovery.EndpointConditions{Ready: ptr.To(true)}})
	}
	l := benchLabels()
	l[discovery.LabelServiceName] = s.name(i)
	l[discovery.LabelManagedBy] = "kubectl-ebpf-bench"
	return &discovery.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: s.name(i), Namespace: s.ns, Labels: l},
		AddressType: discovery.AddressTypeIPv4,
		Endpoints:   eps,
		Ports:       []discovery.EndpointPort{{Name: ptr.To("tcp"), Protocol: ptr.To(v1.ProtocolTCP), Port: ptr.To[int32](backendPort)}},
	}
}

func ensureNamespace(ctx context.Context, c kubernetes.Interface, ns string) error {
	_, err := c.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: benchLabels()}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s: %w", ns, err)
	}
	return nil
}

// create makes Services [from, to) and their slices with bounded
// parallelism, Service before slice (as the EndpointSlice controller would).
// It returns how long the API took.
func (s svcSet) create(ctx context.Context, c kubernetes.Interface, from, to, workers int, progress func(done int)) (time.Duration, error) {
	if err := ensureNamespace(ctx, c, s.ns); err != nil {
		return 0, err
	}
	start := time.Now()
	var done atomic.Int64
	err := parallel(ctx, from, to, workers, func(i int) error {
		if err := createRetry(ctx, func() error {
			_, err := c.CoreV1().Services(s.ns).Create(ctx, s.service(i), metav1.CreateOptions{})
			return err
		}); err != nil {
			return fmt.Errorf("create service %s/%s: %w", s.ns, s.name(i), err)
		}
		if err := createRetry(ctx, func() error {
			_, err := c.DiscoveryV1().EndpointSlices(s.ns).Create(ctx, s.slice(i), metav1.CreateOptions{})
			return err
		}); err != nil {
			return fmt.Errorf("create endpointslice %s/%s: %w", s.ns, s.name(i), err)
		}
		if d := done.Add(1); progress != nil && d%5000 == 0 {
			progress(from + int(d))
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return time.Since(start), ctx.Err()
}

// deleteRange removes Services [from, to) and their slices, in parallel (no
// namespace controller runs, and Services have no deletecollection).
func (s svcSet) deleteRange(ctx context.Context, c kubernetes.Interface, from, to, workers int) error {
	return parallel(ctx, from, to, workers, func(i int) error {
		if err := c.CoreV1().Services(s.ns).Delete(ctx, s.name(i), metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("delete service %s/%s: %w", s.ns, s.name(i), err)
		}
		if err := c.DiscoveryV1().EndpointSlices(s.ns).Delete(ctx, s.name(i), metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("delete endpointslice %s/%s: %w", s.ns, s.name(i), err)
		}
		return nil
	})
}

// parallel calls f for every i in [from, to) from workers goroutines and
// returns the first error; a worker stops at its first error, every worker
// when ctx ends.
func parallel(ctx context.Context, from, to, workers int, f func(i int) error) error {
	var next atomic.Int64
	next.Store(int64(from))
	var wg sync.WaitGroup
	errc := make(chan error, workers)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= to || ctx.Err() != nil {
					return
				}
				if err := f(i); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	return <-errc
}

// createRetry retries create; an object that already exists (a retried
// create that did reach the server) counts as created.
func createRetry(ctx context.Context, create func() error) error {
	return retry(ctx, func() error {
		if err := create(); !apierrors.IsAlreadyExists(err) {
			return err
		}
		return nil
	})
}

func retry(ctx context.Context, f func() error) error {
	var err error
	for i := 0; i < 8; i++ {
		if err = f(); err == nil {
			return nil
		}
		if apierrors.IsInvalid(err) || apierrors.IsBadRequest(err) || ctx.Err() != nil {
			return err
		}
		time.Sleep(time.Duration(50<<i) * time.Millisecond)
	}
	return err
}
