// Command kebpf-cluster brings the local test environment up and down for
// make (cluster-up, cluster-down, demo, e2e): one cluster from the provider this
// machine supports, with the product's images loaded.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/testenv"
)

func main() {
	var name, provider string
	root := &cobra.Command{
		Use:           "kebpf-cluster",
		Short:         "Bring the kubectl-ebpf local cluster up and down",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&name, "name", cluster.DefaultName, "cluster name")
	root.PersistentFlags().StringVar(&provider, "provider", os.Getenv("KEBPF_PROVIDER"), "kind or local (default: kind where it can run, else local)")

	var kubeProxy bool
	var nodes int
	up := &cobra.Command{
		Use:   "up",
		Short: "Create (or reuse) the cluster, build and load the images; print the kubeconfig path",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			e, err := testenv.Up(cmd.Context(), testenv.Options{Name: name, Provider: provider, KubeProxy: kubeProxy, Nodes: nodes, Log: os.Stderr})
			if err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "cluster %s (%s) is up. Use it with:\n  export KUBECONFIG=%s PATH=%s:$PATH\n", e.Name, e.Provider, e.Cluster.Kubeconfig, e.BinDir)
			fmt.Fprintf(os.Stderr, "and install with: kubectl ebpf install --envoy-image %s (its nodes cannot pull the official Envoy)\n", e.Product.EnvoyRef)
			fmt.Println(e.Cluster.Kubeconfig)
			return nil
		},
	}
	up.Flags().BoolVar(&kubeProxy, "kube-proxy", true, "run kube-proxy on the nodes")
	up.Flags().IntVar(&nodes, "nodes", 2, "how many nodes (an existing cluster of another size must be deleted first)")

	down := &cobra.Command{
		Use:   "down",
		Short: "Remove everything the cluster created (also after a failed up)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := testenv.Down(cmd.Context(), name, provider, os.Stderr); err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "cluster %s removed\n", name)
			return nil
		},
	}

	env := &cobra.Command{
		Use:   "env",
		Short: "Print shell exports (KUBECONFIG, PATH, KEBPF_KUBECONFIG, KEBPF_ENVOY_IMAGE, KEBPF_TESTSERVER_IMAGE) for the running cluster",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			e, err := testenv.Load(name)
			if err != nil || e.Cluster.Kubeconfig == "" {
				return fmt.Errorf("cluster %s is not up: run make cluster-up", name)
			}
			fmt.Printf("export KUBECONFIG=%s KEBPF_KUBECONFIG=%s PATH=%s:$PATH\n", e.Cluster.Kubeconfig, e.Cluster.Kubeconfig, e.BinDir)
			// The Envoy image loaded into the nodes, for install --envoy-image.
			if e.Product.EnvoyRef != "" {
				fmt.Printf("export KEBPF_ENVOY_IMAGE=%s\n", e.Product.EnvoyRef)
			}
			// The workload image of the tests and the demo tour.
			if e.Product.TestServerRef != "" {
				fmt.Printf("export KEBPF_TESTSERVER_IMAGE=%s\n", e.Product.TestServerRef)
			}
			return nil
		},
	}
	root.AddCommand(up, down, env)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}
