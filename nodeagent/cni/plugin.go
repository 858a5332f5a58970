package cni

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
)

// Plugin is the chained plugin: skel calls its commands (Funcs).
type Plugin struct {
	// Out receives the result; nil: os.Stdout, where skel wants it.
	Out io.Writer
	// Client talks to the agent; nil: a Client on NetConf.Socket.
	Client *Client
	// Stat checks the enforced marker; nil: os.Stat.
	Stat func(string) (os.FileInfo, error)
}

// Main is the kebpf-cni binary: it runs the command the runtime asked for
// and exits 1 after printing a CNI error.
func Main() {
	skel.PluginMainFuncs((&Plugin{}).Funcs(), Versions, PluginType+": NetworkPolicy in the kernel before a new pod runs")
}

// Funcs are the plugin's CNI commands.
func (p *Plugin) Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: p.Add, Del: p.Del, Check: p.nothing, GC: p.nothing, Status: p.nothing}
}

// nothing is CHECK, GC and STATUS: nothing of ours lives in the sandbox to
// check or collect, and the agent repairs the datapath from the API on its
// own.
func (p *Plugin) nothing(*skel.CmdArgs) error { return nil }

func (p *Plugin) conf(args *skel.CmdArgs) (NetConf, error) {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return conf, err
	}
	if p.Client == nil {
		p.Client = NewClient(conf.Socket)
	}
	if p.Stat == nil {
		p.Stat = os.Stat
	}
	return conf, nil
}

// Del tells the agent the sandbox is gone. It always succeeds (spec), so
// the runtime can always tear a sandbox down; telling the agent is best
// effort.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	if _, err := p.conf(args); err != nil {
		return nil
	}
	var pa k8sArgs
	_ = types.LoadArgs(args.Args, &pa)
	ctx, cancel := context.WithTimeout(context.Background(), delTimeout)
	defer cancel()
	_ = p.Client.Del(ctx, DelRequest{Namespace: string(pa.K8S_POD_NAMESPACE), Name: string(pa.K8S_POD_NAME),
		UID: string(pa.K8S_POD_UID), ContainerID: args.ContainerID})
	return nil
}

// Add hands the pod's addresses to the agent and returns once it programmed
// the pod, then passes the previous plugin's result on.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	conf, err := p.conf(args)
	if err != nil {
		return err
	}
	timeout := DefaultTimeout
	if conf.TimeoutSeconds > 0 {
		timeout = time.Duration(conf.TimeoutSeconds) * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return p.add(ctx, conf, args)
}

func (p *Plugin) add(ctx context.Context, conf NetConf, args *skel.CmdArgs) error {
	if conf.RawPrevResult == nil {
		return types.NewError(codeInvalidConfig, PluginType+" must be chained after the plugin that creates the pod's interface (no prevResult)", "")
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return types.NewError(codeInvalidConfig, "parse prevResult", err.Error())
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return types.NewError(codeInvalidConfig, "parse prevResult", err.Error())
	}
	var pa k8sArgs
	if err := types.LoadArgs(args.Args, &pa); err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "parse CNI_ARGS", err.Error())
	}
	req := AddRequest{Namespace: string(pa.K8S_POD_NAMESPACE), Name: string(pa.K8S_POD_NAME), UID: string(pa.K8S_POD_UID),
		ContainerID: args.ContainerID, Netns: args.Netns}
	for _, ip := range prev.IPs {
		if ip == nil || ip.Address.IP == nil {
			return types.NewError(codeInvalidConfig, "prevResult address", "missing")
		}
		req.IPs = append(req.IPs, ip.Address.IP.String())
	}
	for _, i := range prev.Interfaces {
		if i != nil && i.Sandbox == "" && i.Name != "" {
			req.HostInterfaces = append(req.HostInterfaces, i.Name)
		}
	}
	if req.Namespace == "" || req.Name == "" || len(req.IPs) == 0 {
		// Not a Kubernetes pod (no K8S_POD_* args) or no address: no
		// NetworkPolicy can select it.
		return p.passThrough(conf)
	}
	_, err = p.Client.Add(ctx, req)
	var agentErr *AgentError
	switch {
	case err == nil:
		return p.passThrough(conf)
	case errors.As(err, &agentErr):
		return types.NewError(codeAgentRefused, fmt.Sprintf("kubectl-ebpf agent could not program pod %s/%s", req.Namespace, req.Name),
			agentErr.Msg)
	}
	// The agent is unreachable (restarting, or gone without uninstall).
	if conf.EnforcedMarker != "" {
		if _, serr := p.Stat(conf.EnforcedMarker); serr == nil {
			return types.NewError(codeTryAgain, fmt.Sprintf("kubectl-ebpf agent not reachable at %s while NetworkPolicy enforcement is loaded on this node (%s); the pod would start unprotected, so its sandbox is refused until the agent runs again (or `kubectl ebpf uninstall` removed enforcement)", conf.Socket, conf.EnforcedMarker),
				err.Error())
		}
	}
	return p.passThrough(conf)
}

// passThrough prints the previous plugin's result as ours, in the config's
// version.
func (p *Plugin) passThrough(conf NetConf) error {
	res, err := conf.PrevResult.GetAsVersion(conf.CNIVersion)
	if err != nil {
		return types.NewError(codeInvalidConfig, "convert prevResult", err.Error())
	}
	out := p.Out
	if out == nil {
		out = os.Stdout
	}
	return res.PrintTo(out)
}
