// Package version implements `kubectl ebpf version`.
package version

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
)

// Info is the stable shape of `kubectl ebpf version -o json`.
type Info struct {
	Client Client  `json:"client"`
	Server *Server `json:"server,omitempty"`
}

// Client describes this binary.
type Client struct {
	Version string `json:"version"`
	// VersionSource says where Version came from: "ldflags", "vcs" (the
	// revision in the build info), "module" (go install pkg@vX) or "none".
	VersionSource string `json:"versionSource"`
	GitCommit     string `json:"gitCommit,omitempty"`
	Image         string `json:"defaultImage"`
}

// sourceText explains a version source to a reader.
var sourceText = map[string]string{
	manifests.SourceLDFlags: "set at build time",
	manifests.SourceVCS:     "VCS revision in the build info",
	manifests.SourceModule:  "module version in the build info",
	manifests.SourceNone:    "no version in the build info: built outside a git checkout or with -buildvcs=false",
}

// Server describes the cluster and the installed agent.
type Server struct {
	Kubernetes string `json:"kubernetes"`
	Installed  bool   `json:"installed"`
	// AgentImage and AgentVersion come from the DaemonSet when installed.
	AgentImage   string `json:"agentImage,omitempty"`
	AgentVersion string `json:"agentVersion,omitempty"`
}

// Options are the inputs of one version.
type Options struct {
	kube.Conn
	genericiooptions.IOStreams

	Output string
	Client bool
}

// NewCmd returns the version command.
func NewCmd(flags *genericclioptions.ConfigFlags, streams genericiooptions.IOStreams) *cobra.Command {
	o := &Options{Conn: kube.Conn{Flags: flags}, IOStreams: streams}
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the plugin, Kubernetes and agent versions",
		Args:  cobra.NoArgs,
		RunE:  cmdutil.RunE(o),
	}
	cmd.Flags().StringVarP(&o.Output, "output", "o", "", `"json" or "yaml"`)
	cmd.Flags().BoolVar(&o.Client, "client", false, "print the client version only (no cluster needed)")
	return cmd
}

// Complete fills in defaults.
func (o *Options) Complete(_ []string) error {
	return nil
}

// Validate checks the flags.
func (o *Options) Validate() error {
	return cmdutil.ValidateOutput(o.Output, "json", "yaml")
}

// Run prints the versions. The client version is printed even when the
// cluster cannot be reached; the error follows.
func (o *Options) Run(ctx context.Context) error {
	info := Info{Client: Client{Version: manifests.Version, VersionSource: manifests.VersionSource,
		GitCommit: manifests.GitCommit, Image: manifests.DefaultImage()}}
	var serr error
	if !o.Client {
		info.Server, serr = o.server(ctx)
	}
	if o.Output != "" {
		if err := cmdutil.Print(o.Out, o.Output, info); err != nil {
			return err
		}
		return serr
	}
	from := sourceText[info.Client.VersionSource]
	if info.Client.GitCommit != "" {
		from += ", commit " + info.Client.GitCommit
	}
	fmt.Fprintf(o.Out, "Client Version: %s (%s)\nDefault Image: %s\n", info.Client.Version, from, info.Client.Image)
	if s := info.Server; s != nil {
		fmt.Fprintf(o.Out, "Kubernetes Version: %s\n", s.Kubernetes)
		if s.Installed {
			fmt.Fprintf(o.Out, "Agent Version: %s (image %s)\n", s.AgentVersion, s.AgentImage)
		} else {
			fmt.Fprintln(o.Out, "Agent Version: not installed")
		}
	}
	return serr
}

func (o *Options) server(ctx context.Context) (*Server, error) {
	_, v, err := o.Connect(ctx)
	if err != nil {
		return nil, err
	}
	s := &Server{Kubernetes: v.GitVersion}
	ds, err := o.Clients.Kube.AppsV1().DaemonSets(manifests.Namespace).Get(ctx, manifests.DaemonSetName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return s, nil
	case err != nil:
		return s, fmt.Errorf("get DaemonSet %s: %w", manifests.DaemonSetName, err)
	}
	s.Installed = true
	s.AgentImage = kube.AgentImage(ds)
	s.AgentVersion = ds.Labels["app.kubernetes.io/version"]
	return s, nil
}
