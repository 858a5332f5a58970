//go:build linux

package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
)

// The subcommands the Envoy DaemonSet (manifests/yaml/50-envoy.yaml) runs:
// envoy-bootstrap in its init container, envoy-probe and envoy-drain from
// the copy of this static binary inside the Envoy container, where there is
// no shell and no curl (the official image has no curl, ours nothing at all).

func newEnvoyBootstrapCommand(stdout io.Writer) *cobra.Command {
	var o xds.BootstrapOptions
	var out, copySelf string
	cmd := &cobra.Command{
		Use:   "envoy-bootstrap",
		Short: "Write the node-local Envoy's bootstrap (init container of the Envoy DaemonSet)",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			b, err := xds.Bootstrap(o)
			if err != nil {
				return err
			}
			if err := writeFileAtomic(out, func(w io.Writer) error {
				_, err := w.Write(b)
				return err
			}, 0o644); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "wrote %s (node %s, xds %s)\n", out, o.Node, o.XDSSocket)
			if copySelf == "" {
				return nil
			}
			if err := copyExecutable(copySelf); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "copied kebpf-agent to %s\n", copySelf)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Node, "node", os.Getenv("NODE_NAME"), "Envoy's node id: the Kubernetes node name, which keys the agent's xDS snapshot (default $NODE_NAME)")
	f.StringVar(&o.XDSSocket, "xds-socket", manifests.EnvoyXDSSocket, "the agent's xDS unix socket")
	f.StringVar(&o.AdminSocket, "admin-socket", "", "unix socket for Envoy's admin API (empty: no admin API)")
	f.BoolVar(&o.Delta, "delta", false, "incremental xDS (DELTA_GRPC) instead of state of the world")
	f.StringVar(&out, "out", "", "where to write the bootstrap JSON")
	f.StringVar(&copySelf, "copy-self", "", "also copy this binary here, for envoy-probe and envoy-drain inside the Envoy container")
	_ = cmd.MarkFlagRequired("out")
	return cmd
}

func newEnvoyProbeCommand(stdout io.Writer) *cobra.Command {
	var socket string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "envoy-probe",
		Short: "Exit 0 when Envoy's admin /ready answers 200 (readiness probe of the Envoy DaemonSet)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			body, err := envoyAdmin(ctx, socket, http.MethodGet, "/ready", "envoy not ready")
			if err != nil {
				return err
			}
			fmt.Fprintln(stdout, body)
			return nil
		},
	}
	adminSocketFlag(cmd, &socket)
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Second, "how long to wait for the answer")
	return cmd
}

func newEnvoyDrainCommand(stdout io.Writer) *cobra.Command {
	var socket string
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "envoy-drain",
		Short: "Drain Envoy's listeners gracefully, then wait (preStop hook of the Envoy DaemonSet)",
		Long: "POSTs /drain_listeners?graceful&skip_exit to Envoy's admin API: Envoy asks every client to close " +
			"(HTTP/1.1 Connection: close, HTTP/2 GOAWAY) over its --drain-time-s while still serving, and closes its " +
			"listeners after it. Then waits --wait, so the SIGTERM that follows finds the connections gone.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), 5*time.Second)
			_, err := envoyAdmin(ctx, socket, http.MethodPost, "/drain_listeners?graceful&skip_exit", "envoy refused to drain")
			cancel()
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "draining Envoy's listeners; waiting %s\n", wait)
			select {
			case <-time.After(wait):
			case <-cmd.Context().Done():
			}
			return nil
		},
	}
	adminSocketFlag(cmd, &socket)
	cmd.Flags().DurationVar(&wait, "wait", 15*time.Second, "how long to wait after the drain started: Envoy's --drain-time-s")
	return cmd
}

// adminSocketFlag adds the required --admin-socket of envoy-probe and envoy-drain.
func adminSocketFlag(cmd *cobra.Command, socket *string) {
	cmd.Flags().StringVar(socket, "admin-socket", "", "Envoy's admin unix socket")
	_ = cmd.MarkFlagRequired("admin-socket")
}

// envoyAdmin sends one request to Envoy's admin API on a unix socket and
// returns the trimmed body of a 200; any other status is an error starting
// with refused, with the status and body.
func envoyAdmin(ctx context.Context, socket, method, path, refused string) (string, error) {
	c := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
	}}
	req, err := http.NewRequestWithContext(ctx, method, "http://envoy"+path, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", fmt.Errorf("envoy admin %s %s on %s: %w", method, path, socket, unwrapURL(err))
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if err != nil {
		return "", fmt.Errorf("envoy admin %s %s: read answer: %w", method, path, err)
	}
	body := strings.TrimSpace(string(b))
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %d %s", refused, resp.StatusCode, body)
	}
	return body, nil
}

// unwrapURL drops net/http's `Get "http://envoy/ready": ` prefix: the URL's
// host is made up, the socket is what the message must name.
func unwrapURL(err error) error {
	if u := (*url.Error)(nil); errors.As(err, &u) {
		return u.Err
	}
	return err
}

// copyExecutable copies the running binary to dst, mode 0755.
func copyExecutable(dst string) error {
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own binary: %w", err)
	}
	src, err := os.Open(self)
	if err != nil {
		return err
	}
	defer src.Close()
	return writeFileAtomic(dst, func(w io.Writer) error {
		_, err := io.Copy(w, src)
		return err
	}, 0o755)
}

// writeFileAtomic writes path through a temporary file in its directory, so
// a reader never sees half a file (a restarted init container rewrites it).
func writeFileAtomic(path string, write func(io.Writer) error, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	err = write(f)
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
