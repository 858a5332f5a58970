package kube

import (
	"context"

	"k8s.io/apimachinery/pkg/version"
	"k8s.io/cli-runtime/pkg/genericclioptions"
)

// Conn is how every command reaches the cluster: kubectl's connection flags
// and the clients built from them. Commands embed it in their Options.
type Conn struct {
	Flags *genericclioptions.ConfigFlags
	// Clients may be preset (tests); Connect builds them otherwise.
	Clients *Clients
}

// Connect builds the clients unless a test preset them and checks that the
// API server answers, returning its version. Commands call it from Run,
// after Validate, so bad flags are reported before a bad kubeconfig.
func (c *Conn) Connect(ctx context.Context) (*Clients, *version.Info, error) {
	if c.Clients == nil {
		cs, err := New(c.Flags)
		if err != nil {
			return nil, nil, err
		}
		c.Clients = cs
	}
	v, err := c.Clients.Reachable(ctx)
	if err != nil {
		return nil, nil, err
	}
	return c.Clients, v, nil
}
