//go:build linux

package agent

import (
	"context"
	"fmt"
	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
)

// watchConfig follows the cluster config through the API (a mounted
// ConfigMap file lags by up to a minute) with a single-object informer, and
// wakes the main loop on every change. A ConfigMap that is missing when the
// agent starts means the defaults; one that becomes invalid or is deleted
// later leaves the features as they are, with the error reported.
func (a *Agent) watchConfig(ctx context.Context) {
	ns, name := a.cfg.ConfigNamespace, a.cfg.ConfigName
	f := informers.NewSharedInformerFactoryWithOptions(a.cfg.Kube, 0, informers.WithNamespace(ns),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
		}))
	inf := f.Core().V1().ConfigMaps().Informer()
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { a.setConfig(asConfigMap(o)) },
		UpdateFunc: func(_, o any) { a.setConfig(asConfigMap(o)) },
		DeleteFunc: func(any) {
			a.setConfigErr(fmt.Sprintf("ConfigMap %s/%s deleted; keeping the current features", ns, name))
		},
	})
	if err != nil {
		a.setConfigErr(fmt.Sprintf("watch ConfigMap %s/%s: %v", ns, name, err))
		return
	}
	f.Start(ctx.Done())
	defer f.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return
	}
	a.mu.Lock()
	if !a.haveConfig {
		// Nothing usable yet (missing or invalid from the start): the
		// agent must still do its job, so it runs the defaults.
		a.want, a.haveConfig = a.defaultConfig(), true
		if a.configErr == "" {
			a.configErr = fmt.Sprintf("ConfigMap %s/%s not found; using the defaults", ns, name)
		} else {
			a.configErr += " (using the defaults)"
		}
		a.log.Warn("no valid config; enabling the default features", "configmap", ns+"/"+name, "err", a.configErr)
	}
	a.mu.Unlock()
	a.kick()
	<-ctx.Done()
}

func asConfigMap(o any) *v1.ConfigMap {
	if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = t.Obj
	}
	cm, _ := o.(*v1.ConfigMap)
	return cm
}

func (a *Agent) setConfig(cm *v1.ConfigMap) {
	if cm == nil {
		return
	}
	data, ok := cm.Data[apiv1.ConfigKey]
	var cfg apiv1.AgentConfig
	var err error
	if !ok {
		err = fmt.Errorf("no key %s", apiv1.ConfigKey)
	} else {
		cfg, err = apiv1.ParseConfig([]byte(data))
	}
	if err != nil {
		a.setConfigErr(fmt.Sprintf("ConfigMap %s/%s: %v; keeping the current features", cm.Namespace, cm.Name, err))
		return
	}
	a.mu.Lock()
	a.want, a.haveConfig, a.configErr = cfg, true, ""
	a.mu.Unlock()
	a.log.Info("config", "features", cfg.Features, "resourceVersion", cm.ResourceVersion)
	a.kick()
}

func (a *Agent) setConfigErr(msg string) {
	a.mu.Lock()
	a.configErr = msg
	a.mu.Unlock()
	a.log.Error("config", "err", msg)
	a.kick()
}

// kick wakes the main loop without blocking.
func (a *Agent) kick() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}
