//go:build linux

package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/cni"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/trace"
)

// CNIConfig chains kebpf-cni into the node's CNI configuration while the
// policy feature runs, so a new pod's policy is programmed before its
// containers start (package nodeagent/cni).
type CNIConfig struct {
	// Socket the plugin calls; empty disables the socket and chaining.
	Socket string
	// ConfDir and BinDir are the node's CNI directories as the agent sees
	// them; empty ConfDir: do not chain (the socket is still served).
	ConfDir, BinDir string
	// Plugin is the kebpf-cni binary to install into BinDir.
	Plugin string
	// HostSocket is Socket's path on the host, written into the chained
	// entry for the plugin (which runs on the host); Socket when empty.
	HostSocket string
	// Unchain are the dirs an earlier install chained kebpf-cni into and
	// this one does not (chaining switched off, or moved): it is taken out
	// of them at start, retried until that succeeds.
	Unchain cni.DirsList
}

// DefaultChainInterval: how soon a CNI that rewrote its config gets our
// entry back.
const DefaultChainInterval = 5 * time.Second

// serveCNI serves the plugin's socket until ctx ends.
func (a *Agent) serveCNI(ctx context.Context) error {
	if a.cfg.CNI.Socket == "" {
		return nil
	}
	ln, err := cni.Listen(a.cfg.CNI.Socket)
	if err != nil {
		return err
	}
	// Every admitted or refused sandbox is a trace event (type cni).
	decided := func(d cni.Decision) { a.trace.Publish(trace.CNIEvent(d, a.cfg.NodeName, time.Now())) }
	srv := &http.Server{Handler: cni.Handler(cniAdmitter{a}, a.log.With("component", "cni"), decided), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("cni socket", "err", err)
		}
	}()
	a.log.Info("serving the CNI plugin", "socket", a.cfg.CNI.Socket)
	return nil
}

// cniAdmitter answers the plugin from the policy feature.
type cniAdmitter struct{ a *Agent }

func (c cniAdmitter) policy() (*netpol.Syncer, bool) {
	a := c.a
	a.mu.Lock()
	wanted := a.haveConfig && a.want.Enabled(apiv1.FeaturePolicy)
	a.mu.Unlock()
	for _, st := range a.feats {
		if f, ok := st.f.(*policyFeature); ok {
			return f.policySyncer(), wanted
		}
	}
	return nil, wanted
}

func (c cniAdmitter) Admit(ctx context.Context, req cni.AddRequest) (cni.AddResponse, error) {
	s, wanted := c.policy()
	if s == nil {
		if wanted {
			// Switched on but not running (yet, or failing): a pod started
			// now would go unprotected.
			return cni.AddResponse{}, cni.Refuse("policy-not-running", fmt.Errorf("the policy feature is enabled but not running on node %s yet", c.a.cfg.NodeName))
		}
		return cni.AddResponse{Enforced: false}, nil
	}
	var ips []netip.Addr
	for _, s := range req.IPs {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return cni.AddResponse{}, cni.Refuse("bad-ip", fmt.Errorf("pod IP %q: %w", s, err))
		}
		ips = append(ips, ip.Unmap())
	}
	res, err := s.Admit(ctx, req.Namespace, req.Name, types.UID(req.UID), ips)
	if err != nil {
		return cni.AddResponse{}, err
	}
	return cni.AddResponse{Enforced: true, Endpoint: res.Endpoint, Ingress: res.Ingress, Egress: res.Egress}, nil
}

func (c cniAdmitter) Release(req cni.DelRequest) {
	if s, _ := c.policy(); s != nil {
		s.Release(req.Namespace, req.Name, types.UID(req.UID))
	}
}

// keepChained chains the plugin now and every DefaultChainInterval until
// the returned stop is called. marker is the path whose existence tells
// the plugin enforcement is loaded.
func (a *Agent) keepChained(ctx context.Context, marker string) (stop func()) {
	c := a.cfg.CNI
	if c.Socket == "" || c.ConfDir == "" {
		return func() {}
	}
	host := c.HostSocket
	if host == "" {
		host = c.Socket
	}
	in := &cni.Installer{ConfDir: c.ConfDir, BinDir: c.BinDir, PluginBinary: c.Plugin,
		Entry: map[string]any{"socket": host, "enforcedMarker": marker}}
	var lastErr string
	ensure := func() {
		changed, err := in.Ensure()
		for _, ch := range changed {
			a.log.Info("cni", "change", ch)
		}
		if msg := fmt.Sprint(err); err != nil && msg != lastErr {
			a.log.Warn("cni chaining", "err", err, "confDir", c.ConfDir)
			lastErr = msg
		} else if err == nil {
			lastErr = ""
		}
	}
	// Once before Enable returns, so a ready agent has chained (when the
	// node has a CNI config at all).
	ensure()
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(DefaultChainInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				ensure()
			}
		}
	}()
	return func() {
		cancel()
		<-done
	}
}

// removal is why the agent is stopping, as far as the API server tells:
// "" for a restart (or when it cannot tell), else what is being removed.
func (a *Agent) removal(ctx context.Context) string {
	if a.cfg.Kube == nil {
		return ""
	}
	// The namespace first: when it is being deleted the Role that lets us
	// read the DaemonSet may already be gone; namespaces are readable
	// through the ClusterRole.
	ns, err := a.cfg.Kube.CoreV1().Namespaces().Get(ctx, a.cfg.ConfigNamespace, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return "namespace " + a.cfg.ConfigNamespace + " deleted"
	case err == nil && ns.DeletionTimestamp != nil:
		return "namespace " + a.cfg.ConfigNamespace + " being deleted"
	case err != nil:
		a.log.Warn("cni: cannot tell a restart from a removal; kebpf-cni stays chained", "err", err)
		return ""
	}
	ds, err := a.cfg.Kube.AppsV1().DaemonSets(a.cfg.ConfigNamespace).Get(ctx, manifests.DaemonSetName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return "DaemonSet " + manifests.DaemonSetName + " deleted"
	case err == nil && ds.DeletionTimestamp != nil:
		return "DaemonSet " + manifests.DaemonSetName + " being deleted"
	case err != nil:
		a.log.Warn("cni: cannot tell a restart from a removal; kebpf-cni stays chained", "err", err)
	}
	return ""
}

// unchainIfRemoved takes kebpf-cni out when the agent stops because it is
// being removed (its DaemonSet or namespace deleted without `kubectl ebpf
// uninstall`): no agent will come back to answer the plugin, which would
// otherwise refuse every new pod of the node (fail closed) for good. On a
// restart or upgrade it stays chained, so no pod starts unprotected while
// the next agent comes up.
func (a *Agent) unchainIfRemoved() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	why := a.removal(ctx)
	if why == "" {
		return
	}
	a.log.Info("cni: the agent is being removed, not restarted: unchaining kebpf-cni so the node keeps starting pods", "why", why)
	if err := a.unchain(); err != nil {
		a.log.Error("cni: unchain on removal", "err", err)
	}
}

// unchain removes the plugin from the node's CNI configuration.
func (a *Agent) unchain() error {
	c := a.cfg.CNI
	if c.ConfDir == "" {
		return nil
	}
	done, err := cni.Remove(c.ConfDir, c.BinDir)
	for _, d := range done {
		a.log.Info("cni", "change", d)
	}
	return err
}

// unchainStale takes kebpf-cni out of the dirs an earlier install chained
// it into, retrying every DefaultChainInterval until every pair is clean
// or ctx ends. The DaemonSet replaced the earlier agent before this one
// started, so nothing chains there again.
func (a *Agent) unchainStale(ctx context.Context) {
	todo := slices.Clone(a.cfg.CNI.Unchain)
	for len(todo) > 0 {
		var failed cni.DirsList
		for _, d := range todo {
			done, err := cni.Remove(d.Conf, d.Bin)
			for _, ch := range done {
				a.log.Info("cni: earlier install's dirs", "change", ch)
			}
			if err != nil {
				a.log.Warn("cni: taking kebpf-cni out of an earlier install's dirs", "dirs", d.String(), "err", err)
				failed = append(failed, d)
			}
		}
		todo = failed
		if len(todo) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(DefaultChainInterval):
		}
	}
}
