package kube

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/yaml"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

// ErrNotInstalled is returned when the agent ConfigMap does not exist.
var ErrNotInstalled = errors.New(`kubectl-ebpf is not installed (no ConfigMap ` + manifests.Namespace + "/" + manifests.ConfigMapName + `): run "kubectl ebpf install"`)

// GetConfigMap reads the agent ConfigMap; ErrNotInstalled when it is absent.
func (c *Clients) GetConfigMap(ctx context.Context) (*corev1.ConfigMap, error) {
	cm, err := c.Kube.CoreV1().ConfigMaps(manifests.Namespace).Get(ctx, manifests.ConfigMapName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, ErrNotInstalled
	}
	if err != nil {
		return nil, fmt.Errorf("get ConfigMap %s/%s: %w", manifests.Namespace, manifests.ConfigMapName, err)
	}
	return cm, nil
}

// LenientConfig parses the ConfigMap's config.yaml keeping only the features
// this plugin knows; it returns the names it dropped. Unlike
// apiv1.ParseConfig it tolerates unknown names, so a config written by a
// newer plugin (or edited by hand) can still be carried over and repaired.
func LenientConfig(cm *corev1.ConfigMap) (cfg apiv1.AgentConfig, dropped []string, err error) {
	raw := cm.Data[apiv1.ConfigKey]
	if err := yaml.Unmarshal([]byte(raw), &cfg); err != nil {
		return apiv1.AgentConfig{}, nil, fmt.Errorf("parse %s in ConfigMap %s/%s: %w", apiv1.ConfigKey, cm.Namespace, cm.Name, err)
	}
	if cfg.Features == nil {
		cfg.Features = map[string]bool{}
	}
	for name := range cfg.Features {
		if !slices.Contains(apiv1.KnownFeatures, name) {
			dropped = append(dropped, name)
			delete(cfg.Features, name)
		}
	}
	sort.Strings(dropped)
	return cfg, dropped, nil
}

// EnabledFeatures lists the features cfg switches on, sorted.
func EnabledFeatures(cfg apiv1.AgentConfig) []string {
	out := []string{}
	for name, on := range cfg.Features {
		if on {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

// ConfigChanged is when the ConfigMap was last written: the newest
// managedFields timestamp. Every write through the API (apply, update, kubectl
// edit) stamps its manager's entry with the server's clock; only the
// timestamp's second resolution is lost, which a 30s grace period absorbs.
func ConfigChanged(cm *corev1.ConfigMap) time.Time {
	t := cm.CreationTimestamp.Time
	for _, e := range cm.ManagedFields {
		if e.Time != nil && e.Time.After(t) {
			t = e.Time.Time
		}
	}
	return t
}

// SetFeature switches feature on or off in the agent ConfigMap, leaving the
// other features as they are. It reads config.yaml, changes the one entry and
// server-side applies the whole ConfigMap exactly as install renders it,
// under install's field manager: install applying the same content later is
// then a no-op (an Update would move field ownership and make the next install
// rewrite the object). The applied object carries the resourceVersion read,
// so a concurrent writer makes the apply conflict and it is retried from a
// fresh read instead of losing that writer's change.
// changed is false when the feature was already in the requested state (no
// write then); dropped lists unknown feature names removed on the way.
func (c *Clients) SetFeature(ctx context.Context, feature string, on bool) (changed bool, dropped []string, err error) {
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cm, err := c.GetConfigMap(ctx)
		if err != nil {
			return err
		}
		cfg, d, err := LenientConfig(cm)
		if err != nil {
			return fmt.Errorf(`%w: run "kubectl ebpf install" to reset it`, err)
		}
		dropped = d
		// A feature missing from the map is off, so disabling it needs no write.
		wasOn := cfg.Enabled(feature)
		changed = wasOn != on
		if !changed && len(d) == 0 {
			return nil
		}
		cfg.Features[feature] = on
		ac, err := configMapApply(cfg)
		if err != nil {
			return err
		}
		ac.WithResourceVersion(cm.ResourceVersion)
		_, err = c.Kube.CoreV1().ConfigMaps(manifests.Namespace).Apply(ctx, ac, metav1.ApplyOptions{FieldManager: manifests.FieldManager, Force: true})
		if err != nil && !apierrors.IsConflict(err) {
			return fmt.Errorf("apply ConfigMap %s/%s: %w", manifests.Namespace, manifests.ConfigMapName, err)
		}
		return err // a conflict is retried
	})
	return changed, dropped, err
}

// configMapApply is the agent ConfigMap as install would apply it with cfg.
func configMapApply(cfg apiv1.AgentConfig) (*corev1ac.ConfigMapApplyConfiguration, error) {
	objs, err := manifests.Objects(manifests.RenderOptions{Config: &cfg})
	if err != nil {
		return nil, err
	}
	for _, o := range objs {
		if o.GetKind() != "ConfigMap" || o.GetName() != manifests.ConfigMapName {
			continue
		}
		var cm corev1.ConfigMap
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &cm); err != nil {
			return nil, fmt.Errorf("convert ConfigMap: %w", err)
		}
		ac := corev1ac.ConfigMap(cm.Name, cm.Namespace).WithLabels(cm.Labels).WithData(cm.Data)
		if len(cm.Annotations) > 0 {
			ac.WithAnnotations(cm.Annotations)
		}
		return ac, nil
	}
	return nil, errors.New("manifests render no ConfigMap " + manifests.ConfigMapName)
}

// APIServerEndpoint is one address and port the API server really listens on,
// from the EndpointSlices of the default/kubernetes Service (the API servers
// maintain them themselves, so this works without a controller-manager),
// falling back to the Endpoints object on clusters without EndpointSlices.
// With several API servers it picks the first in a stable order: the agent
// can name only one in KUBERNETES_SERVICE_HOST.
func (c *Clients) APIServerEndpoint(ctx context.Context) (host, port string, err error) {
	list, err := c.Kube.DiscoveryV1().EndpointSlices(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=kubernetes"})
	switch {
	case err == nil:
		if host, port, ok := fromSlices(list.Items); ok {
			return host, port, nil
		}
	case apierrors.IsNotFound(err) || apierrors.IsForbidden(err):
		// Try the older API below.
	default:
		return "", "", fmt.Errorf("list EndpointSlices of service default/kubernetes: %w", err)
	}
	ep, err := c.Kube.CoreV1().Endpoints(metav1.NamespaceDefault).Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		return "", "", fmt.Errorf("get Endpoints default/kubernetes: %w", err)
	}
	if host, port, ok := fromEndpoints(ep); ok {
		return host, port, nil
	}
	return "", "", errors.New("service default/kubernetes has no ready endpoint")
}

func fromSlices(items []discoveryv1.EndpointSlice) (host, port string, ok bool) {
	// IPv4 first, then by name: the same cluster always yields the same
	// answer, so a re-install does not roll the agents for nothing.
	sort.Slice(items, func(i, j int) bool {
		if items[i].AddressType != items[j].AddressType {
			return items[i].AddressType == discoveryv1.AddressTypeIPv4
		}
		return items[i].Name < items[j].Name
	})
	for _, s := range items {
		if s.AddressType != discoveryv1.AddressTypeIPv4 && s.AddressType != discoveryv1.AddressTypeIPv6 {
			continue
		}
		p, ok := slicePort(s.Ports)
		if !ok {
			continue
		}
		for _, e := range s.Endpoints {
			if e.Conditions.Ready != nil && !*e.Conditions.Ready {
				continue
			}
			if len(e.Addresses) > 0 {
				return e.Addresses[0], strconv.Itoa(int(p)), true
			}
		}
	}
	return "", "", false
}

func slicePort(ports []discoveryv1.EndpointPort) (int32, bool) {
	var first *int32
	for _, p := range ports {
		if p.Port == nil || (p.Protocol != nil && *p.Protocol != corev1.ProtocolTCP) {
			continue
		}
		if p.Name != nil && *p.Name == "https" {
			return *p.Port, true
		}
		if first == nil {
			first = p.Port
		}
	}
	if first == nil {
		return 0, false
	}
	return *first, true
}

func fromEndpoints(ep *corev1.Endpoints) (host, port string, ok bool) {
	for _, s := range ep.Subsets {
		if len(s.Addresses) == 0 || len(s.Ports) == 0 {
			continue
		}
		p := s.Ports[0].Port
		for _, sp := range s.Ports {
			if sp.Name == "https" {
				p = sp.Port
			}
		}
		return s.Addresses[0].IP, strconv.Itoa(int(p)), true
	}
	return "", "", false
}
