package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"time"
)

// supportedVersions are the CNI spec versions whose results we pass
// through. We never build a result ourselves, only return the previous
// plugin's, so every version with prevResult (0.3.0 on) works.
var supportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// CNI error codes (spec section "Error"): 7 invalid network config, 11 try
// again later; 100+ are ours.
const (
	codeInvalidConfig = 7
	codeTryAgain      = 11
	codeAgentRefused  = 100
)

// DefaultTimeout bounds one ADD: the agent answers as soon as the pod's
// endpoint is programmed (milliseconds), unless the API server is slow to
// show it the pod.
const DefaultTimeout = 30 * time.Second

// NetConf is our entry in the conflist, as the runtime passes it on stdin
// (with prevResult added).
type NetConf struct {
	CNIVersion string `json:"cniVersion"`
	Name       string `json:"name"`
	Type       string `json:"type"`
	// Socket of the agent; DefaultSocket when empty.
	Socket string `json:"socket,omitempty"`
	// EnforcedMarker exists while the policy datapath is loaded on the node
	// (a pinned map). When the agent cannot be reached and it exists, ADD
	// fails (fail closed); when it does not exist, ADD passes through.
	EnforcedMarker string `json:"enforcedMarker,omitempty"`
	// TimeoutSeconds bounds an ADD (DefaultTimeout when 0).
	TimeoutSeconds int             `json:"timeoutSeconds,omitempty"`
	PrevResult     json.RawMessage `json:"prevResult,omitempty"`
}

// Error is a CNI error result; the plugin prints it and exits 1.
type Error struct {
	CNIVersion string `json:"cniVersion"`
	Code       int    `json:"code"`
	Msg        string `json:"msg"`
	Details    string `json:"details,omitempty"`
}

func (e *Error) Error() string {
	if e.Details != "" {
		return e.Msg + ": " + e.Details
	}
	return e.Msg
}

// Env is the CNI environment of one invocation.
type Env struct {
	Command, ContainerID, Netns, IfName, Args string
}

// EnvFromOS reads the CNI_* variables.
func EnvFromOS() Env {
	return Env{Command: os.Getenv("CNI_COMMAND"), ContainerID: os.Getenv("CNI_CONTAINERID"),
		Netns: os.Getenv("CNI_NETNS"), IfName: os.Getenv("CNI_IFNAME"), Args: os.Getenv("CNI_ARGS")}
}

// Plugin runs one CNI invocation. Dial reaches the agent; nil dials
// NetConf.Socket.
type Plugin struct {
	Env   Env
	Stdin io.Reader
	Out   io.Writer
	// Client talks to the agent; nil: a Client on NetConf.Socket.
	Client *Client
	// Stat checks the enforced marker; nil: os.Stat.
	Stat func(string) (os.FileInfo, error)
}

// Run executes the command. A returned *Error must be printed (WriteError)
// and the process must exit 1.
func (p *Plugin) Run(ctx context.Context) error {
	if p.Env.Command == "VERSION" {
		return json.NewEncoder(p.Out).Encode(map[string]any{"cniVersion": supportedVersions[len(supportedVersions)-1],
			"supportedVersions": supportedVersions})
	}
	raw, err := io.ReadAll(p.Stdin)
	if err != nil {
		return &Error{Code: codeInvalidConfig, Msg: "read network config", Details: err.Error()}
	}
	var conf NetConf
	if err := json.Unmarshal(raw, &conf); err != nil {
		return &Error{Code: codeInvalidConfig, Msg: "parse network config", Details: err.Error()}
	}
	if conf.Socket == "" {
		conf.Socket = DefaultSocket
	}
	timeout := DefaultTimeout
	if conf.TimeoutSeconds > 0 {
		timeout = time.Duration(conf.TimeoutSeconds) * time.Second
	}
	if p.Client == nil {
		p.Client = NewClient(conf.Socket)
	}
	if p.Stat == nil {
		p.Stat = os.Stat
	}
	args := parseArgs(p.Env.Args)
	withVersion := func(err error) error {
		var e *Error
		if errors.As(err, &e) && e.CNIVersion == "" {
			e.CNIVersion = conf.CNIVersion
		}
		return err
	}
	switch p.Env.Command {
	case "ADD":
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		return withVersion(p.add(ctx, conf, args))
	case "DEL":
		// DEL must succeed whatever state we are in (spec), so the runtime
		// can always tear a sandbox down; telling the agent is best effort.
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		_ = p.Client.Del(ctx, DelRequest{Namespace: args["K8S_POD_NAMESPACE"], Name: args["K8S_POD_NAME"],
			UID: args["K8S_POD_UID"], ContainerID: p.Env.ContainerID})
		return nil
	case "CHECK", "GC", "STATUS":
		// Nothing of ours lives in the sandbox to check or collect: the
		// agent repairs the datapath from the API on its own.
		return nil
	default:
		return withVersion(&Error{Code: 4, Msg: fmt.Sprintf("unknown CNI_COMMAND %q", p.Env.Command)})
	}
}

func (p *Plugin) add(ctx context.Context, conf NetConf, args map[string]string) error {
	if len(conf.PrevResult) == 0 || string(conf.PrevResult) == "null" {
		return &Error{Code: codeInvalidConfig, Msg: PluginType + " must be chained after the plugin that creates the pod's interface (no prevResult)"}
	}
	var prev struct {
		IPs []struct {
			Address string `json:"address"`
		} `json:"ips"`
		Interfaces []struct {
			Name    string `json:"name"`
			Sandbox string `json:"sandbox"`
		} `json:"interfaces"`
	}
	if err := json.Unmarshal(conf.PrevResult, &prev); err != nil {
		return &Error{Code: codeInvalidConfig, Msg: "parse prevResult", Details: err.Error()}
	}
	req := AddRequest{Namespace: args["K8S_POD_NAMESPACE"], Name: args["K8S_POD_NAME"], UID: args["K8S_POD_UID"],
		ContainerID: p.Env.ContainerID, Netns: p.Env.Netns}
	for _, ip := range prev.IPs {
		pfx, err := netip.ParsePrefix(ip.Address)
		if err != nil {
			return &Error{Code: codeInvalidConfig, Msg: "prevResult address", Details: err.Error()}
		}
		req.IPs = append(req.IPs, pfx.Addr().String())
	}
	for _, i := range prev.Interfaces {
		if i.Sandbox == "" && i.Name != "" {
			req.HostInterfaces = append(req.HostInterfaces, i.Name)
		}
	}
	if req.Namespace == "" || req.Name == "" || len(req.IPs) == 0 {
		// Not a Kubernetes pod (no K8S_POD_* args) or no address: no
		// NetworkPolicy can select it.
		return p.passThrough(conf)
	}
	_, err := p.Client.Add(ctx, req)
	var agentErr *AgentError
	switch {
	case err == nil:
		return p.passThrough(conf)
	case errors.As(err, &agentErr):
		return &Error{Code: codeAgentRefused, Msg: fmt.Sprintf("kubectl-ebpf agent could not program pod %s/%s", req.Namespace, req.Name),
			Details: agentErr.Msg}
	}
	// The agent is unreachable (restarting, or gone without uninstall).
	if conf.EnforcedMarker != "" {
		if _, serr := p.Stat(conf.EnforcedMarker); serr == nil {
			return &Error{Code: codeTryAgain, Msg: fmt.Sprintf("kubectl-ebpf agent not reachable at %s while NetworkPolicy enforcement is loaded on this node (%s); the pod would start unprotected, so its sandbox is refused until the agent runs again (or `kubectl ebpf uninstall` removed enforcement)", conf.Socket, conf.EnforcedMarker),
				Details: err.Error()}
		}
	}
	return p.passThrough(conf)
}

// passThrough prints the previous plugin's result as ours.
func (p *Plugin) passThrough(conf NetConf) error {
	var res map[string]any
	if err := json.Unmarshal(conf.PrevResult, &res); err != nil || res == nil {
		return &Error{Code: codeInvalidConfig, Msg: "parse prevResult", Details: fmt.Sprint(err)}
	}
	res["cniVersion"] = conf.CNIVersion
	return json.NewEncoder(p.Out).Encode(res)
}

// WriteError prints err as a CNI error result.
func WriteError(w io.Writer, err error) {
	var e *Error
	if !errors.As(err, &e) {
		e = &Error{Code: 999, Msg: err.Error()}
	}
	_ = json.NewEncoder(w).Encode(e)
}

// parseArgs splits CNI_ARGS ("K1=V1;K2=V2").
func parseArgs(s string) map[string]string {
	out := map[string]string{}
	for _, kv := range strings.Split(s, ";") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			out[k] = v
		}
	}
	return out
}
