package kube

import (
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

func TestFromSlices(t *testing.T) {
	ready := func(addr string, ok *bool) discoveryv1.Endpoint {
		return discoveryv1.Endpoint{Addresses: []string{addr}, Conditions: discoveryv1.EndpointConditions{Ready: ok}}
	}
	https := discoveryv1.EndpointPort{Name: ptr.To("https"), Port: ptr.To(int32(6443)), Protocol: ptr.To(corev1.ProtocolTCP)}
	tests := []struct {
		name       string
		slices     []discoveryv1.EndpointSlice
		host, port string
		ok         bool
	}{
		{name: "ready endpoint", slices: []discoveryv1.EndpointSlice{{AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints: []discoveryv1.Endpoint{ready("10.0.0.1", ptr.To(true))}, Ports: []discoveryv1.EndpointPort{https}}},
			host: "10.0.0.1", port: "6443", ok: true},
		{name: "unset ready counts as ready", slices: []discoveryv1.EndpointSlice{{AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints: []discoveryv1.Endpoint{ready("10.0.0.1", nil)}, Ports: []discoveryv1.EndpointPort{https}}},
			host: "10.0.0.1", port: "6443", ok: true},
		{name: "not ready skipped", slices: []discoveryv1.EndpointSlice{{AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints: []discoveryv1.Endpoint{ready("10.0.0.1", ptr.To(false)), ready("10.0.0.2", ptr.To(true))}, Ports: []discoveryv1.EndpointPort{https}}},
			host: "10.0.0.2", port: "6443", ok: true},
		{name: "https port preferred", slices: []discoveryv1.EndpointSlice{{AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints: []discoveryv1.Endpoint{ready("10.0.0.1", nil)},
			Ports:     []discoveryv1.EndpointPort{{Name: ptr.To("other"), Port: ptr.To(int32(1))}, https}}},
			host: "10.0.0.1", port: "6443", ok: true},
		{name: "FQDN slices ignored", slices: []discoveryv1.EndpointSlice{{AddressType: discoveryv1.AddressTypeFQDN,
			Endpoints: []discoveryv1.Endpoint{ready("api.example", nil)}, Ports: []discoveryv1.EndpointPort{https}}}},
		{name: "no ports", slices: []discoveryv1.EndpointSlice{{AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints: []discoveryv1.Endpoint{ready("10.0.0.1", nil)}}}},
		{name: "none"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host, port, ok := fromSlices(tt.slices)
			if host != tt.host || port != tt.port || ok != tt.ok {
				t.Errorf("fromSlices = %q %q %v, want %q %q %v", host, port, ok, tt.host, tt.port, tt.ok)
			}
		})
	}
}

func TestConfigChanged(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{CreationTimestamp: metav1.NewTime(t0)}}
	if got := ConfigChanged(cm); !got.Equal(t0) {
		t.Errorf("no managedFields: %v, want the creation time %v", got, t0)
	}
	cm.ManagedFields = []metav1.ManagedFieldsEntry{
		{Manager: "kubectl-ebpf", Time: ptr.To(metav1.NewTime(t0.Add(time.Minute)))},
		{Manager: "kubectl-edit", Time: ptr.To(metav1.NewTime(t0.Add(2 * time.Minute)))},
		{Manager: "no-time"},
	}
	if got := ConfigChanged(cm); !got.Equal(t0.Add(2 * time.Minute)) {
		t.Errorf("ConfigChanged = %v, want the newest entry", got)
	}
}
