//go:build linux

package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// Feature is one datapath feature the cluster config switches on and off
// (`kubectl ebpf enable|disable <name>`).
type Feature interface {
	// Name is the config key and the NodeState.Status.Active entry.
	Name() string
	// Enable attaches the feature, taking over pinned state a previous
	// agent left. It is called again after a failure; ctx lives until
	// Disable or Close, so the feature may run goroutines under it.
	Enable(ctx context.Context) error
	// Disable detaches the feature and unpins its links and maps, leaving
	// nothing behind. It must also work when Enable never ran in this
	// process (state pinned by an earlier agent) and when nothing exists.
	Disable() error
	// Close releases this process's handles and leaves the feature
	// attached through its pins (agent exit: the datapath keeps running).
	Close() error
}

// ErrorReporter is implemented by features with errors found while running
// (after Enable succeeded), e.g. a Service that did not fit the maps.
type ErrorReporter interface {
	Errors() []string
}

// StatusContributor is implemented by features with state of their own in
// NodeState (l7: the node's Envoy). Called with the agent's lock held.
type StatusContributor interface {
	ContributeStatus(st *apiv1.NodeStateStatus)
}

// featureState is the agent's view of one feature.
type featureState struct {
	f Feature
	// kernel are the probes Enable needs (Registration.Kernel).
	kernel []string
	active bool
	// clean: Disable succeeded since the agent started, so a disabled
	// feature needs no further work.
	clean bool
	err   string
}

// converge enables the features the config enables and disables the others.
// Failures are kept as the feature's error and retried by the next call.
func (a *Agent) converge(ctx context.Context) {
	a.mu.Lock()
	cfg, have := a.want, a.haveConfig
	a.mu.Unlock()
	if !have {
		return
	}
	for _, st := range a.feats {
		name := st.f.Name()
		if cfg.Enabled(name) {
			if st.active {
				continue
			}
			err := a.requireKernel(st.kernel...)
			if err == nil {
				err = a.ensureMounts()
			}
			if err == nil {
				err = st.f.Enable(ctx)
			}
			a.mu.Lock()
			if err != nil {
				st.err = err.Error()
			} else {
				st.active, st.clean, st.err = true, false, ""
			}
			a.mu.Unlock()
			if err != nil {
				a.log.Error("enable feature", "feature", name, "err", err)
			} else {
				a.log.Info("feature enabled", "feature", name)
				a.keepOrder(st)
			}
			continue
		}
		if st.clean {
			continue
		}
		err := st.f.Disable()
		a.mu.Lock()
		wasActive := st.active
		st.active = false
		if err != nil {
			st.err = "disable: " + err.Error()
		} else {
			st.clean, st.err = true, ""
		}
		a.mu.Unlock()
		switch {
		case err != nil:
			a.log.Error("disable feature", "feature", name, "err", err)
		case wasActive:
			a.log.Info("feature disabled", "feature", name)
		default:
			a.log.Debug("feature disabled (removed any state left by an earlier agent)", "feature", name)
		}
	}
}

// orderKeeper is a feature whose programs must run after other features'
// at the same hook (l7 after the socket LB).
type orderKeeper interface {
	ensureOrder() error
}

const orderErr = "program order: "

// keepOrder lets every other active feature restore its place in the run
// order after enabled attached its programs.
func (a *Agent) keepOrder(enabled *featureState) {
	for _, st := range a.feats {
		a.mu.Lock()
		active := st.active
		a.mu.Unlock()
		k, ok := st.f.(orderKeeper)
		if !ok || !active || st == enabled {
			continue
		}
		err := k.ensureOrder()
		a.mu.Lock()
		switch {
		case err != nil:
			st.err = orderErr + err.Error()
		case strings.HasPrefix(st.err, orderErr):
			st.err = ""
		}
		a.mu.Unlock()
		if err != nil {
			a.log.Error("restore program order", "feature", st.f.Name(), "err", err)
		}
	}
}

// pendingRetry reports whether a converge would have work to do.
func (a *Agent) pendingRetry() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.haveConfig {
		return false
	}
	for _, st := range a.feats {
		if a.want.Enabled(st.f.Name()) != st.active || (!st.active && !st.clean) {
			return true
		}
	}
	return false
}

// closeFeatures releases handles and leaves everything attached.
func (a *Agent) closeFeatures() {
	for _, st := range a.feats {
		if !st.active {
			continue
		}
		if err := st.f.Close(); err != nil {
			a.log.Error("close feature", "feature", st.f.Name(), "err", err)
		}
	}
}

// activeAndErrors is what NodeState reports; call with a.mu held.
func (a *Agent) activeAndErrorsLocked() (active, errs []string) {
	if a.configErr != "" {
		errs = append(errs, a.configErr)
	}
	for _, st := range a.feats {
		name := st.f.Name()
		if st.active {
			active = append(active, name)
		}
		if st.err != "" {
			errs = append(errs, name+": "+st.err)
		}
		if r, ok := st.f.(ErrorReporter); ok && st.active {
			for _, e := range r.Errors() {
				errs = append(errs, name+": "+e)
			}
		}
	}
	return active, errs
}

// notReadyReason is why the agent is not ready, "" when it is; a.mu held.
func (a *Agent) notReadyReasonLocked() string {
	if !a.haveConfig {
		if a.configErr != "" {
			return "config not read yet: " + a.configErr
		}
		return "config not read yet"
	}
	for _, st := range a.feats {
		name := st.f.Name()
		if a.want.Enabled(name) && !st.active {
			if st.err != "" {
				return fmt.Sprintf("feature %s not active: %s", name, st.err)
			}
			return fmt.Sprintf("feature %s not active yet", name)
		}
	}
	if !a.published {
		return "NodeState not published yet"
	}
	return ""
}

// defaultConfig enables every known feature this agent has.
func (a *Agent) defaultConfig() apiv1.AgentConfig {
	c := apiv1.DefaultConfig()
	for name := range c.Features {
		if !slices.ContainsFunc(a.feats, func(st *featureState) bool { return st.f.Name() == name }) {
			delete(c.Features, name)
		}
	}
	return c
}

// requireKernel fails when a kernel feature a datapath feature needs is
// missing, naming them all.
func (a *Agent) requireKernel(names ...string) error {
	a.mu.Lock()
	probed := a.features
	a.mu.Unlock()
	var missing []string
	for _, n := range names {
		i := slices.IndexFunc(probed, func(f apiv1.KernelFeature) bool { return f.Name == n })
		switch {
		case i < 0:
			missing = append(missing, n+" (not probed)")
		case !probed[i].Available:
			missing = append(missing, n+" ("+probed[i].Detail+")")
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("required kernel feature(s) unavailable: %s", strings.Join(missing, "; "))
	}
	return nil
}
