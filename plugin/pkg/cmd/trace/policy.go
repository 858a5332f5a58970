package trace

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
)

// Exit statuses of `trace policy`.
const (
	PolicyExitAllowed = 0
	PolicyExitDenied  = 1
	PolicyExitError   = 2
)

// PolicyOptions are the inputs of one `trace policy`.
type PolicyOptions struct {
	kube.Conn
	genericiooptions.IOStreams

	From, To string
	Port     int
	Protocol string
	Output   string

	// Dial reaches an agent pod (default: port-forward).
	Dial Dialer

	query apiv1.ExplainQuery
}

func newPolicyCmd(flags *genericclioptions.ConfigFlags, streams genericiooptions.IOStreams) *cobra.Command {
	o := &PolicyOptions{Conn: kube.Conn{Flags: flags}, IOStreams: streams}
	cmd := &cobra.Command{
		Use:   "policy --from NS/POD --to NS/POD --port PORT [--protocol TCP]",
		Short: "Explain whether a connection would be allowed, and which policy decides, without sending traffic",
		Long: "Asks the agents of the nodes hosting both pods, from the compiled state their datapath enforces: the source " +
			"pod's egress and the destination pod's ingress, which policies select each, which rule allows or whose default " +
			"deny applies. The connection is allowed only if both sides allow it.\n\n" +
			"Exit status: 0 allowed, 1 denied, 2 the question could not be answered.",
		Example: `  kubectl ebpf trace policy --from shop/frontend-7d9 --to shop/cart-5f6 --port 8080`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			// Every failure is exit 2, so a script can tell "denied" (1)
			// from "could not say".
			if err := cmdutil.RunE(o)(cmd, args); err != nil {
				if _, silent := cmdutil.IsSilent(err); silent {
					return err
				}
				return &cmdutil.CodeError{Code: PolicyExitError, Err: err}
			}
			return nil
		},
	}
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return &cmdutil.CodeError{Code: PolicyExitError, Err: err}
	})
	f := cmd.Flags()
	f.StringVar(&o.From, "from", "", "source pod, namespace/name")
	f.StringVar(&o.To, "to", "", "destination pod, namespace/name")
	f.IntVar(&o.Port, "port", 0, "destination port")
	f.StringVar(&o.Protocol, "protocol", "TCP", "TCP, UDP or SCTP")
	f.StringVarP(&o.Output, "output", "o", "", `"json" for the combined explanation as JSON`)
	return cmd
}

// Complete builds the /explain query.
func (o *PolicyOptions) Complete(_ []string) error { return nil }

// Validate checks the flags with the agent's own parser; no API call.
func (o *PolicyOptions) Validate() error {
	if err := cmdutil.ValidateOutput(o.Output, "json"); err != nil {
		return err
	}
	if o.From == "" || o.To == "" || o.Port == 0 {
		return errors.New("--from, --to and --port are required")
	}
	v := map[string][]string{
		apiv1.ExplainParamFrom: {o.From}, apiv1.ExplainParamTo: {o.To},
		apiv1.ExplainParamPort: {fmt.Sprint(o.Port)}, apiv1.ExplainParamProtocol: {o.Protocol},
	}
	q, err := apiv1.ParseExplainQuery(v)
	if err != nil {
		return fmt.Errorf("invalid flags: %w", err)
	}
	o.query = q
	return nil
}

// Explanation is the combined answer `trace policy -o json` prints.
type Explanation struct {
	From     string `json:"from"`
	To       string `json:"to"`
	Port     uint16 `json:"port"`
	Protocol string `json:"protocol"`
	// Verdict is allowed only when both sides allow.
	Verdict string                       `json:"verdict"`
	Egress  *apiv1.PolicyExplanationSide `json:"egress"`
	Ingress *apiv1.PolicyExplanationSide `json:"ingress"`
}

// Run asks the agents and prints the explanation.
func (o *PolicyOptions) Run(ctx context.Context) error {
	c, _, err := o.Connect(ctx)
	if err != nil {
		return err
	}
	var nsPerms []kube.Permission
	for _, ns := range uniq(o.query.From.Namespace, o.query.To.Namespace) {
		nsPerms = append(nsPerms, kube.Permission{Verb: "get", Resource: "pods", Namespace: ns})
	}
	if err := checkAccess(ctx, c, nsPerms...); err != nil {
		return err
	}
	if o.Dial == nil {
		o.Dial = portForwardDialer(c)
	}
	fromNode, err := podNode(ctx, c, o.query.From)
	if err != nil {
		return err
	}
	toNode, err := podNode(ctx, c, o.query.To)
	if err != nil {
		return err
	}
	agents, notRunning, err := agentPods(ctx, c)
	if err != nil {
		return err
	}
	answers := map[string]*apiv1.PolicyExplanation{}
	for _, node := range uniq(fromNode, toNode) {
		pod := agents[node]
		if pod == nil {
			why := notRunning[node]
			if why == "" {
				why = "no agent pod"
			}
			return fmt.Errorf("node %s: %s", node, why)
		}
		a, err := o.explain(ctx, node, pod)
		if err != nil {
			return err
		}
		answers[node] = a
	}
	e, err := combine(o.query, fromNode, toNode, answers)
	if err != nil {
		return err
	}
	if o.Output == "json" {
		if err := cmdutil.PrintJSON(o.Out, e); err != nil {
			return err
		}
	} else {
		printExplanation(o.Out, e)
	}
	if e.Verdict != apiv1.TraceVerdictAllowed {
		return &cmdutil.ExitError{Code: PolicyExitDenied}
	}
	return nil
}

func uniq(a, b string) []string {
	if a == b {
		return []string{a}
	}
	return []string{a, b}
}

// podNode is the node a pod runs on.
func podNode(ctx context.Context, c *kube.Clients, ref apiv1.TracePodRef) (string, error) {
	p, err := c.Kube.CoreV1().Pods(ref.Namespace).Get(ctx, ref.Name, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("pod %s: %w", ref, err)
	}
	if p.Spec.NodeName == "" {
		return "", fmt.Errorf("pod %s is not scheduled on a node yet", ref)
	}
	if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return "", fmt.Errorf("pod %s has finished (%s): no datapath judges it", ref, p.Status.Phase)
	}
	return p.Spec.NodeName, nil
}

// explain asks one node's agent.
func (o *PolicyOptions) explain(ctx context.Context, node string, pod *corev1.Pod) (*apiv1.PolicyExplanation, error) {
	client, closeConn, err := o.Dial(ctx, pod)
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", node, err)
	}
	defer closeConn()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, agentURL(apiv1.ExplainPath, o.query.Encode()), nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("node %s: agent pod %s: %w", node, pod.Name, err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound:
		io.Copy(io.Discard, resp.Body)
		return nil, fmt.Errorf("node %s: agent pod %s has no %s (an agent older than this plugin?)", node, pod.Name, apiv1.ExplainPath)
	default:
		return nil, agentError(node, resp)
	}
	var a apiv1.PolicyExplanation
	if err := readJSON(resp.Body, &a); err != nil {
		return nil, fmt.Errorf("node %s: read explanation: %w", node, err)
	}
	return &a, nil
}

// combine takes the source's egress from its node's answer and the
// destination's ingress from its node's answer: allowed only if both are.
func combine(q apiv1.ExplainQuery, fromNode, toNode string, answers map[string]*apiv1.PolicyExplanation) (*Explanation, error) {
	e := &Explanation{From: q.From.String(), To: q.To.String(), Port: q.Port, Protocol: q.Protocol}
	if a := answers[fromNode]; a != nil {
		e.Egress = a.Egress
	}
	if a := answers[toNode]; a != nil {
		e.Ingress = a.Ingress
	}
	if e.Egress == nil {
		return nil, fmt.Errorf("node %s did not judge the egress of %s", fromNode, e.From)
	}
	if e.Ingress == nil {
		return nil, fmt.Errorf("node %s did not judge the ingress of %s", toNode, e.To)
	}
	for _, s := range []*apiv1.PolicyExplanationSide{e.Egress, e.Ingress} {
		if s.Verdict != apiv1.TraceVerdictAllowed && s.Verdict != apiv1.TraceVerdictDenied {
			return nil, fmt.Errorf("node %s answered verdict %q for %s", s.Node, s.Verdict, s.Pod)
		}
	}
	e.Verdict = apiv1.TraceVerdictDenied
	if e.Egress.Verdict == apiv1.TraceVerdictAllowed && e.Ingress.Verdict == apiv1.TraceVerdictAllowed {
		e.Verdict = apiv1.TraceVerdictAllowed
	}
	return e, nil
}

// printExplanation writes the verdict and one paragraph per side.
func printExplanation(w io.Writer, e *Explanation) {
	fmt.Fprintf(w, "%s -> %s %s/%d: %s\n", e.From, e.To, e.Protocol, e.Port, strings.ToUpper(e.Verdict))
	for _, s := range []struct {
		dir  string
		side *apiv1.PolicyExplanationSide
	}{{"egress", e.Egress}, {"ingress", e.Ingress}} {
		fmt.Fprintf(w, "  %s of %s (node %s): %s\n", s.dir, s.side.Pod, s.side.Node, sideText(s.dir, s.side))
		if len(s.side.SelectedBy) > 0 {
			fmt.Fprintf(w, "    selected by: %s\n", strings.Join(s.side.SelectedBy, ", "))
		}
	}
}

func sideText(dir string, s *apiv1.PolicyExplanationSide) string {
	switch s.Reason {
	case apiv1.TraceReasonPolicy:
		r := "allowed by " + policyName(s.Policy)
		if s.Policy != nil && s.Policy.Rule != nil {
			r += fmt.Sprintf(" (%s rule %d)", dir, *s.Policy.Rule)
		}
		return r
	case apiv1.TraceReasonDefaultDeny:
		return "denied: default deny of " + policyName(s.Policy) + " (no " + dir + " rule of the policies selecting the pod allows it)"
	case apiv1.TraceReasonNotEnforced:
		return "allowed: not enforced (no policy selects the pod for " + dir + ")"
	case apiv1.TraceReasonHost:
		return s.Verdict + ": the peer is a node address"
	}
	r := s.Verdict
	if s.Reason != "" {
		r += " (" + s.Reason + ")"
	}
	if s.Policy != nil {
		r += ", " + policyName(s.Policy)
	}
	return r
}
