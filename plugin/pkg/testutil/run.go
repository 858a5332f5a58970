package testutil

import (
	"context"
	"strings"
	"testing"

	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
)

// RunOptions runs o the way its command does (Complete with args,
// Validate, Run), failing the test when Complete or Validate fails, and
// returns Run's error.
func RunOptions(t *testing.T, o cmdutil.Options, args ...string) error {
	t.Helper()
	if err := o.Complete(args); err != nil {
		t.Fatal(err)
	}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	return o.Run(context.Background())
}

// FailsBeforeAPICall runs `kubectl ebpf args...` with a kubeconfig that
// points nowhere: the command must fail with one `error: ` line that does not
// mention the cluster, i.e. it rejected its input before any API call. It
// returns that line.
func FailsBeforeAPICall(t *testing.T, args ...string) string {
	t.Helper()
	r := Run(t, Flags(t, "/nonexistent/kubeconfig"), args...)
	if r.Code == 0 {
		t.Fatalf("succeeded: %s", r)
	}
	line := OneLine(t, r.Stderr)
	if strings.Contains(line, "kubeconfig") || strings.Contains(line, "reach") {
		t.Errorf("error mentions the cluster, so an API call was tried: %q", line)
	}
	return line
}
