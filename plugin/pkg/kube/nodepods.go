package kube

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// PodRun is how one of RunOnNodes' pods ended.
type PodRun struct {
	Node, Pod string
	// Succeeded: every container exited 0. Failed: one exited non-zero.
	Succeeded, Failed bool
	// Stuck is the PodSummary of a pod that waiting will not fix (an
	// image that cannot be pulled, a container that cannot be created),
	// with the kubelet's message when it gave one.
	Stuck string
}

// PendingError names the nodes whose pod had not ended when the context did.
type PendingError struct{ Nodes []string }

func (e *PendingError) Error() string {
	return "node(s) " + strings.Join(e.Nodes, ", ") + " still running"
}

// ReadyNodes lists the nodes whose Ready condition is true, and the others.
func (c *Clients) ReadyNodes(ctx context.Context) (ready, notReady []string, err error) {
	nodes, err := c.Kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, nil, fmt.Errorf("list nodes: %w", err)
	}
	for i := range nodes.Items {
		if NodeReady(&nodes.Items[i]) {
			ready = append(ready, nodes.Items[i].Name)
		} else {
			notReady = append(notReady, nodes.Items[i].Name)
		}
	}
	return ready, notReady, nil
}

// NodeReady reports whether the node's Ready condition is true.
func NodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// NodePod is the skeleton of a per-node pod of ours: pinned to node (no
// scheduler), run once, on the host network (no CNI, so it runs even
// where kebpf-cni refuses sandboxes), tolerating every taint, no API
// token, labelled name and managed by us (uninstall removes leftovers).
func NodePod(name, node string, grace int64) *corev1.Pod {
	labels := manifests.CommonLabels()
	labels[manifests.LabelName] = name
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{GenerateName: name + "-", Namespace: manifests.Namespace, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			RestartPolicy:                 corev1.RestartPolicyNever,
			HostNetwork:                   true,
			Tolerations:                   []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
			AutomountServiceAccountToken:  ptr.To(false),
			TerminationGracePeriodSeconds: ptr.To(grace),
			PriorityClassName:             "system-node-critical",
		},
	}
}

// RunOnNodes creates pod(node) on each of nodes (pods carrying the label
// selector sel, in namespace ns), then polls them every interval until each
// succeeded, failed or is stuck, calling done once per pod as it ends. The
// pods are deleted before it returns, whatever happened. When ctx ends
// first the error is a *PendingError naming the nodes not done.
func (c *Clients) RunOnNodes(ctx context.Context, ns, sel string, nodes []string, pod func(node string) *corev1.Pod,
	interval time.Duration, done func(PodRun)) error {
	pods := c.Kube.CoreV1().Pods(ns)
	defer func() {
		// With a fresh context: ctx may be what ended.
		dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = c.DeletePods(dctx, ns, sel)
	}()
	podNode := map[string]string{}
	for _, node := range nodes {
		p, err := pods.Create(ctx, pod(node), metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create pod on node %s: %w", node, err)
		}
		podNode[p.Name] = node
	}
	ended := map[string]bool{}
	for len(ended) < len(podNode) {
		l, err := pods.List(ctx, metav1.ListOptions{LabelSelector: sel})
		if err != nil && ctx.Err() == nil {
			return fmt.Errorf("list pods %s: %w", sel, err)
		}
		for i := range l.Items {
			p := &l.Items[i]
			node, ours := podNode[p.Name]
			if !ours || ended[p.Name] {
				continue
			}
			r := PodRun{Node: node, Pod: p.Name}
			summary, stuck := PodSummary(p)
			switch {
			case p.Status.Phase == corev1.PodSucceeded:
				r.Succeeded = true
			case p.Status.Phase == corev1.PodFailed:
				r.Failed = true
			case stuck:
				r.Stuck = summary
				if msg := waitingMessage(p); msg != "" {
					r.Stuck += ": " + msg
				}
			default:
				continue
			}
			ended[p.Name] = true
			done(r)
		}
		if len(ended) == len(podNode) {
			break
		}
		select {
		case <-ctx.Done():
			var pending []string
			for p, n := range podNode {
				if !ended[p] {
					pending = append(pending, n)
				}
			}
			slices.Sort(pending)
			return &PendingError{Nodes: pending}
		case <-time.After(interval):
		}
	}
	return nil
}

// waitingMessage is the kubelet's message on the first waiting container,
// e.g. why an image cannot be pulled, on one line.
func waitingMessage(p *corev1.Pod) string {
	for _, cs := range append(slices.Clone(p.Status.InitContainerStatuses), p.Status.ContainerStatuses...) {
		if w := cs.State.Waiting; w != nil && w.Message != "" {
			return strings.Join(strings.Fields(w.Message), " ")
		}
	}
	return ""
}

// DeletePods deletes the pods in ns matching selector, at once: the
// per-node pods have nothing to shut down gracefully.
func (c *Clients) DeletePods(ctx context.Context, ns, selector string) error {
	pods := c.Kube.CoreV1().Pods(ns)
	l, err := pods.List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return err
	}
	for _, p := range l.Items {
		if err := pods.Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
	}
	return nil
}
