package root_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/root"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
)

func TestExecute(t *testing.T) {
	tests := []struct {
		name       string
		err        error
		args       []string
		wantCode   int
		wantStderr string
	}{
		{name: "ok", wantCode: 0},
		{name: "plain error", err: errors.New("boom"), wantCode: 1, wantStderr: "error: boom\n"},
		{name: "multi-line error shows first line", err: errors.New("first\nsecond"), wantCode: 1, wantStderr: "error: first\n"},
		{name: "multi-line error at -v 1", err: errors.New("first\nsecond"), args: []string{"-v", "1"}, wantCode: 1, wantStderr: "error: first\nsecond\n"},
		{name: "silent exit", err: fmt.Errorf("wrapped: %w", cmdutil.ErrUnhealthy), wantCode: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			streams := genericiooptions.IOStreams{Out: &out, ErrOut: &errOut}
			cmd := root.NewCmd(nil, streams)
			cmd.AddCommand(&cobra.Command{Use: "fail", RunE: func(*cobra.Command, []string) error { return tt.err }})
			code := root.Execute(context.Background(), cmd, append([]string{"fail"}, tt.args...), streams)
			if code != tt.wantCode || errOut.String() != tt.wantStderr {
				t.Errorf("code %d stderr %q, want %d %q", code, errOut.String(), tt.wantCode, tt.wantStderr)
			}
		})
	}
}

func TestCompletion(t *testing.T) {
	var out bytes.Buffer
	streams := genericiooptions.IOStreams{Out: &out, ErrOut: &out}
	if code := root.Execute(context.Background(), root.NewCmd(nil, streams), []string{"completion", "bash"}, streams); code != 0 {
		t.Fatalf("completion bash: exit %d: %s", code, out.String())
	}
	if !strings.Contains(out.String(), "bash completion") {
		t.Errorf("not a bash completion script: %.200s", out.String())
	}
}
