package kube

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"
)

// fatalReasons are waiting reasons a pod does not recover from without help,
// so waiting for it is pointless.
var fatalReasons = map[string]bool{
	"ErrImageNeverPull":          true,
	"ErrImagePull":               true,
	"ImagePullBackOff":           true,
	"InvalidImageName":           true,
	"CreateContainerConfigError": true,
	"CreateContainerError":       true,
	"RunContainerError":          true,
	"CrashLoopBackOff":           true,
}

// PodSummary describes a pod in a few words ("Running", "Pending
// (ErrImageNeverPull)", "Running, not ready") and whether its state is one
// that waiting will not fix.
func PodSummary(pod *corev1.Pod) (summary string, stuck bool) {
	if pod.DeletionTimestamp != nil {
		return "Terminating", false
	}
	statuses := append(append([]corev1.ContainerStatus{}, pod.Status.InitContainerStatuses...), pod.Status.ContainerStatuses...)
	for _, cs := range statuses {
		if w := cs.State.Waiting; w != nil && w.Reason != "" && w.Reason != "PodInitializing" && w.Reason != "ContainerCreating" {
			return fmt.Sprintf("%s (%s: %s)", pod.Status.Phase, cs.Name, w.Reason), fatalReasons[w.Reason]
		}
	}
	if pod.Status.Phase == corev1.PodPending {
		for _, c := range pod.Status.Conditions {
			if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Reason != "" {
				return fmt.Sprintf("Pending (%s)", c.Reason), false
			}
		}
	}
	if pod.Status.Phase == corev1.PodRunning {
		for _, c := range pod.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status != corev1.ConditionTrue {
				return "Running, not ready", false
			}
		}
	}
	if pod.Status.Phase == "" {
		return "Pending", false
	}
	return string(pod.Status.Phase), false
}
