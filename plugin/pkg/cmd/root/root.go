// Package root assembles the kubectl-ebpf command tree and turns a command's
// error into one line on stderr and an exit code.
package root

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	"k8s.io/klog/v2"

	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/feature"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/install"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/status"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/trace"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/uninstall"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/version"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
)

// NewCmd builds the root command. flags may be nil (a fresh set is made);
// tests pass their own to point at a test cluster.
func NewCmd(flags *genericclioptions.ConfigFlags, streams genericiooptions.IOStreams) *cobra.Command {
	if flags == nil {
		flags = genericclioptions.NewConfigFlags(true)
	}
	var verbosity int
	cmd := &cobra.Command{
		Use:   "kubectl-ebpf",
		Short: "Install and manage the kubectl-ebpf node agents",
		Long: "kubectl ebpf installs node agents that give the cluster an eBPF datapath " +
			"(connect-time service load balancing, network policy, L7 steering) and reports their health.",
		Annotations: map[string]string{
			// Makes cobra's usage and completion say "kubectl ebpf".
			cobra.CommandDisplayNameAnnotation: "kubectl ebpf",
		},
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			level := slog.LevelWarn
			if verbosity > 0 {
				level = slog.LevelDebug
			}
			slog.SetDefault(slog.New(slog.NewTextHandler(streams.ErrOut, &slog.HandlerOptions{Level: level})))
			// client-go logs through klog; -v 6 and up shows its requests, as in kubectl.
			fs := flag.NewFlagSet("klog", flag.ContinueOnError)
			klog.InitFlags(fs)
			// Below 5 klog would only add client-go start-up chatter.
			klogV := 0
			if verbosity >= 5 {
				klogV = verbosity
			}
			_ = fs.Set("v", strconv.Itoa(klogV))
			// Route klog to our stream rather than the process's stderr; with an
			// output set, klog writes no log files either.
			_ = fs.Set("logtostderr", "false")
			klog.SetOutput(streams.ErrOut)
			return nil
		},
	}
	cmd.SetIn(streams.In)
	cmd.SetOut(streams.Out)
	cmd.SetErr(streams.ErrOut)
	flags.AddFlags(cmd.PersistentFlags())
	cmd.PersistentFlags().IntVarP(&verbosity, "v", "v", 0, "log verbosity: 1 shows each step, 6 and up the API requests too")
	cmd.AddCommand(
		install.NewCmd(flags, streams),
		feature.NewEnableCmd(flags, streams),
		feature.NewDisableCmd(flags, streams),
		status.NewCmd(flags, streams),
		trace.NewCmd(flags, streams),
		uninstall.NewCmd(flags, streams),
		version.NewCmd(flags, streams),
	)
	return cmd
}

// Execute runs cmd with args and returns the process exit code. A failure is
// reported as one `error: ...` line; the rest of a multi-line error only at -v 1.
func Execute(ctx context.Context, cmd *cobra.Command, args []string, streams genericiooptions.IOStreams) int {
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	if code, ok := cmdutil.IsSilent(err); ok {
		return code
	}
	msg := strings.TrimSpace(err.Error())
	first, rest, _ := strings.Cut(msg, "\n")
	fmt.Fprintf(streams.ErrOut, "error: %s\n", first)
	if rest != "" && verbose(cmd) {
		fmt.Fprintln(streams.ErrOut, rest)
	}
	if errors.Is(err, context.Canceled) {
		return 130
	}
	var ce *cmdutil.CodeError
	if errors.As(err, &ce) {
		return ce.Code
	}
	return 1
}

func verbose(cmd *cobra.Command) bool {
	f := cmd.PersistentFlags().Lookup("v")
	return f != nil && f.Value.String() != "0"
}
