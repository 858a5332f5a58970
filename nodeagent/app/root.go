//go:build linux

// Package app holds the kebpf-agent cobra commands; main.go is a stub.
package app

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"
)

// logOptions are shared by every subcommand.
//
// Levels: error = the agent cannot do its job; warn = fallback taken
// (e.g. the agent mounted something itself); info = lifecycle (attached,
// published, stopped); debug = every heartbeat.
type logOptions struct {
	format string
	level  string
}

func (o *logOptions) logger(w io.Writer) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(o.level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", o.level, err)
	}
	hopts := &slog.HandlerOptions{Level: lvl}
	switch strings.ToLower(o.format) {
	case "json":
		return slog.New(slog.NewJSONHandler(w, hopts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, hopts)), nil
	default:
		return nil, fmt.Errorf("--log-format %q: want text or json", o.format)
	}
}

// NewRootCommand builds `kebpf-agent` with run, mount, cleanup, version and
// the Envoy DaemonSet's envoy-bootstrap, envoy-probe and envoy-drain.
func NewRootCommand(stdout, stderr io.Writer) *cobra.Command {
	lo := &logOptions{}
	root := &cobra.Command{
		Use:           "kebpf-agent",
		Short:         "kubectl-ebpf node agent",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.PersistentFlags().StringVar(&lo.format, "log-format", "json", "log format: text or json")
	root.PersistentFlags().StringVar(&lo.level, "log-level", "info", "log level: debug, info, warn or error")
	root.AddCommand(
		newRunCommand(lo, stderr),
		newMountCommand(lo, stdout, stderr),
		newCleanupCommand(lo, stdout, stderr),
		newVersionCommand(stdout),
		newEnvoyBootstrapCommand(stdout),
		newEnvoyProbeCommand(stdout),
		newEnvoyDrainCommand(stdout),
	)
	return root
}

// Main runs the root command and returns the process exit code.
func Main() int {
	cmd := NewRootCommand(os.Stdout, os.Stderr)
	if err := cmd.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		return 1
	}
	return 0
}
