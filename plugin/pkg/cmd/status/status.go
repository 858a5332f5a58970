// Package status implements `kubectl ebpf status`.
package status

import (
	"context"
	"errors"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/health"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
)

// ErrNotInstalled is returned when the namespace, CRD or DaemonSet is absent.
var ErrNotInstalled = errors.New(`not installed: run "kubectl ebpf install"`)

// Options are the inputs of one status.
type Options struct {
	kube.Conn
	genericiooptions.IOStreams

	Output  string
	Wait    bool
	Timeout time.Duration

	// Now is the clock heartbeats are judged by.
	Now          func() time.Time
	PollInterval time.Duration
}

// NewCmd returns the status command.
func NewCmd(flags *genericclioptions.ConfigFlags, streams genericiooptions.IOStreams) *cobra.Command {
	o := &Options{Conn: kube.Conn{Flags: flags}, IOStreams: streams, Now: time.Now, PollInterval: 2 * time.Second}
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the agent's health on every node",
		Long: "One row per node from the NodeState objects the agents write, the DaemonSet and the agent pods. " +
			"Exits non-zero when kubectl-ebpf is not installed or any node is not ready.",
		Args: cobra.NoArgs,
		RunE: cmdutil.RunE(o),
	}
	cmd.Flags().StringVarP(&o.Output, "output", "o", "", `"wide", "json" or "yaml"`)
	cmd.Flags().BoolVar(&o.Wait, "wait", false, "wait until every node is ready and runs the configured features")
	cmd.Flags().DurationVar(&o.Timeout, "timeout", 5*time.Minute, "how long --wait waits")
	return cmd
}

// Complete fills in defaults.
func (o *Options) Complete(_ []string) error {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.PollInterval <= 0 {
		o.PollInterval = 2 * time.Second
	}
	return nil
}

// Validate checks the flags.
func (o *Options) Validate() error {
	if err := cmdutil.ValidateOutput(o.Output, "wide", "json", "yaml"); err != nil {
		return err
	}
	return cmdutil.ValidateTimeout(o.Timeout)
}

// Run prints the report; its error says whether everything is healthy.
func (o *Options) Run(ctx context.Context) error {
	if _, _, err := o.Connect(ctx); err != nil {
		return err
	}
	r, err := o.collect(ctx)
	if err != nil {
		return err
	}
	switch o.Output {
	case "json", "yaml":
		if err := cmdutil.Print(o.Out, o.Output, r); err != nil {
			return err
		}
		if !r.Installed {
			return ErrNotInstalled
		}
	default:
		if !r.Installed {
			return ErrNotInstalled
		}
		if err := health.PrintTable(o.Out, r, o.Output == "wide"); err != nil {
			return err
		}
	}
	if !r.Healthy() {
		// The report already says what is wrong; only the exit code remains.
		return cmdutil.ErrUnhealthy
	}
	return nil
}

// collect reads the report once, or with --wait until it is healthy and every
// node runs exactly the configured features, or the timeout passes (the last
// report is returned either way).
func (o *Options) collect(ctx context.Context) (*health.Report, error) {
	r, err := health.Collect(ctx, o.Clients, o.Now())
	if err != nil || !o.Wait || r.Settled() {
		return r, err
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	for {
		select {
		case <-ctx.Done():
			return r, nil
		case <-time.After(o.PollInterval):
		}
		next, err := health.Collect(ctx, o.Clients, o.Now())
		if err != nil {
			if ctx.Err() != nil {
				return r, nil
			}
			return nil, err
		}
		r = next
		if r.Settled() {
			return r, nil
		}
	}
}
