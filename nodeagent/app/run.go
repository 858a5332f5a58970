//go:build linux

package app

import (
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/client/versioned"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/agent"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/cni"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/mounts"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/trace"
)

// defaultStateDir is on the host's /run (the DaemonSet mounts
// /run/kubectl-ebpf): it outlives agent restarts and, like the pins, not a
// reboot.
const defaultStateDir = "/run/kubectl-ebpf/state"

type runOptions struct {
	nodeName   string
	pinDir     string
	cgroupRoot string
	healthAddr string
	kubeconfig string
	cni        agent.CNIConfig
	attach     netpol.AttachMode
	stateDir   string
	traceRing  int
	traceQueue int
	lbTrace    bool
}

func newRunCommand(lo *logOptions, stderr io.Writer) *cobra.Command {
	o := &runOptions{}
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the node agent daemon",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := lo.logger(stderr)
			if err != nil {
				return err
			}
			cfg, err := o.restConfig()
			if err != nil {
				return err
			}
			// Through an API server outage the datapath keeps its state;
			// requests wait for the server, so the agent resyncs within a
			// second of its return (apisync.WaitForAPIServer says why).
			apisync.WaitForAPIServer(cfg, time.Second, 10*time.Minute)
			client, err := versioned.NewForConfig(cfg)
			if err != nil {
				return fmt.Errorf("nodestate client: %w", err)
			}
			kube, err := kubernetes.NewForConfig(cfg)
			if err != nil {
				return fmt.Errorf("kubernetes client: %w", err)
			}
			a, err := agent.New(agent.Config{
				NodeName:     o.nodeName,
				PinDir:       o.pinDir,
				CgroupRoot:   o.cgroupRoot,
				HealthAddr:   o.healthAddr,
				Version:      manifests.Version,
				Client:       client,
				Kube:         kube,
				Log:          log,
				CNI:          o.cni,
				PolicyAttach: o.attach,
				StateDir:     o.stateDir,
				Trace:        trace.Options{RingSize: o.traceRing, QueueSize: o.traceQueue},
				LBTraceOff:   !o.lbTrace,
			})
			if err != nil {
				return err
			}
			// SIGTERM ends Run, which exits WITHOUT detaching: the pinned
			// link keeps the datapath alive until the next agent takes it over.
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, os.Interrupt)
			defer stop()
			log.Info("starting", "version", manifests.Version, "node", o.nodeName,
				"pinDir", o.pinDir, "cgroupRoot", o.cgroupRoot)
			return a.Run(ctx)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.nodeName, "node-name", os.Getenv("NODE_NAME"), "name of this node (default $NODE_NAME)")
	f.StringVar(&o.pinDir, "pin-dir", mounts.DefaultPinDir, "bpffs directory holding our pinned links and maps")
	f.StringVar(&o.cgroupRoot, "cgroup-root", mounts.DefaultCgroupRoot, "cgroup v2 mount to attach cgroup programs at")
	f.StringVar(&o.healthAddr, "health-addr", fmt.Sprintf("127.0.0.1:%d", manifests.AgentHealthPort), "loopback address for /healthz, /readyz, /metrics and /trace (kubectl ebpf trace port-forwards to it)")
	f.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig for running outside a pod (default: in-cluster config)")
	f.StringVar(&o.cni.Socket, "cni-socket", cni.DefaultSocket, "unix socket the kebpf-cni plugin calls (empty: no socket, no chaining)")
	f.StringVar(&o.cni.ConfDir, "cni-conf-dir", "", "the node's CNI config dir as mounted in the agent; kebpf-cni is chained into its primary config while the policy feature runs (empty: no chaining)")
	f.StringVar(&o.cni.BinDir, "cni-bin-dir", "", "the node's CNI plugin dir as mounted in the agent (kebpf-cni is copied there)")
	f.Var(&o.cni.Unchain, "cni-unchain", "CONF_DIR:BIN_DIR an earlier install chained kebpf-cni into, as mounted in the agent: taken out at start (repeatable; one side may be empty)")
	f.Var(&o.attach, "policy-attach", "how the policy programs attach to pod interfaces: auto (tcx where the kernel has it, else clsact), tcx or clsact")
	f.StringVar(&o.stateDir, "state-dir", defaultStateDir, "directory for state that must outlive the agent as long as its pins do (the policy ID -> name mapping of the trace); empty: none")
	f.IntVar(&o.traceRing, "trace-events", trace.DefaultRingSize, "how many of this node's last trace events the agent keeps for /trace history")
	f.IntVar(&o.traceQueue, "trace-queue", trace.DefaultQueueSize, "how many events one /trace client may lag behind before its stream loses events (shown in the stream)")
	f.BoolVar(&o.lbTrace, "lb-trace", true, "socket LB trace events (translated/refused/destroyed with process context); off, the connect() hooks write nothing")
	f.StringVar(&o.cni.Plugin, "cni-plugin", "/usr/local/bin/kebpf-cni", "the kebpf-cni binary to install")
	return cmd
}

func (o *runOptions) restConfig() (*rest.Config, error) {
	if o.kubeconfig != "" {
		cfg, err := clientcmd.BuildConfigFromFlags("", o.kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("load kubeconfig %s: %w", o.kubeconfig, err)
		}
		return cfg, nil
	}
	cfg, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("in-cluster config (use --kubeconfig outside a pod): %w", err)
	}
	return cfg, nil
}
