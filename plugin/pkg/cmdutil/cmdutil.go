// Package cmdutil holds what every kubectl-ebpf command shares: the
// Complete/Validate/Run sequence, the exit-code error type, output-format
// validation and YAML/JSON printing.
package cmdutil

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"
)

// ExitError makes the root command exit with Code without printing anything:
// the command has already told the user what is wrong (e.g. the status table).
type ExitError struct{ Code int }

func (e *ExitError) Error() string { return fmt.Sprintf("exit status %d", e.Code) }

// ErrUnhealthy is returned after a report that already shows the problem.
var ErrUnhealthy = &ExitError{Code: 1}

// CodeError is an error the root command prints as usual (one `error:`
// line) but exits with Code instead of 1: for commands whose exit status
// carries an answer (`trace policy`: 1 is "denied", errors are 2).
type CodeError struct {
	Code int
	Err  error
}

func (e *CodeError) Error() string { return e.Err.Error() }
func (e *CodeError) Unwrap() error { return e.Err }

// IsSilent reports whether err should be turned into an exit code only.
func IsSilent(err error) (int, bool) {
	var e *ExitError
	if errors.As(err, &e) {
		return e.Code, true
	}
	return 0, false
}

// ValidateOutput checks an -o value against the formats a command supports.
func ValidateOutput(got string, allowed ...string) error {
	if got == "" || slices.Contains(allowed, got) {
		return nil
	}
	return fmt.Errorf("invalid output format %q: want one of %s", got, strings.Join(allowed, ", "))
}

// PrintJSON writes v as indented JSON.
func PrintJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

// PrintYAML writes v as YAML.
func PrintYAML(w io.Writer, v any) error {
	b, err := yaml.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// Print writes v in format ("json" or "yaml").
func Print(w io.Writer, format string, v any) error {
	if format == "json" {
		return PrintJSON(w, v)
	}
	return PrintYAML(w, v)
}

// Options are one command's inputs, run in the order sample-cli-plugin
// uses: Complete (defaults, args), Validate (no API call), Run.
type Options interface {
	Complete(args []string) error
	Validate() error
	Run(ctx context.Context) error
}

// RunE is the cobra RunE of every command: Complete, Validate, Run.
func RunE(o Options) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		if err := o.Complete(args); err != nil {
			return err
		}
		if err := o.Validate(); err != nil {
			return err
		}
		return o.Run(cmd.Context())
	}
}

// ValidateTimeout checks a --timeout value.
func ValidateTimeout(d time.Duration) error {
	if d <= 0 {
		return fmt.Errorf("invalid --timeout %s: must be positive", d)
	}
	return nil
}
