package local

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
)

// component is one long-running process of the cluster.
type component struct {
	name string
	bin  string
	args []string
	// node, when set, runs the component inside that node's namespaces
	// and cgroups.
	node *node
	// launch, when set, is the argv actually started; it must end up
	// exec'ing bin (alive checks the process runs bin).
	launch []string
	env    []string
}

// exited records processes started by this process that already died, so a
// wait loop can fail fast with the component's log instead of timing out.
var exited sync.Map // name -> error

func (s *state) pidFile(name string) string { return filepath.Join(s.dir, "run", name+".pid") }
func (s *state) logFile(name string) string { return filepath.Join(s.dir, "logs", name+".log") }

// start runs c detached (own session, output to its log file) so it
// outlives the command that created the cluster, and records its pid.
func (s *state) start(c component) (int, error) {
	if pid := s.alive(c.name); pid > 0 {
		return pid, nil
	}
	for _, d := range []string{filepath.Dir(s.pidFile(c.name)), filepath.Dir(s.logFile(c.name))} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return 0, fmt.Errorf("create %s: %w", d, err)
		}
	}
	logf, err := os.OpenFile(s.logFile(c.name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return 0, fmt.Errorf("open log of %s: %w", c.name, err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "\n==== %s %s %s\n", time.Now().Format(time.RFC3339), c.bin, strings.Join(c.args, " "))
	argv := append([]string{c.bin}, c.args...)
	env := c.env
	if c.node != nil {
		nenv, err := s.nodeEnv(*c.node)
		if err != nil {
			return 0, err
		}
		env = append(env, nenv...)
		argv = inNode(argv)
	}
	if c.launch != nil {
		argv = c.launch
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Dir = s.dir
	cmd.Env = append(append(os.Environ(), "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start %s: %w", c.name, err)
	}
	pid := cmd.Process.Pid
	if err := os.WriteFile(s.pidFile(c.name), []byte(strconv.Itoa(pid)+"\n"+c.bin+"\n"), 0o644); err != nil {
		return pid, fmt.Errorf("write pid file of %s: %w", c.name, err)
	}
	exited.Delete(c.name)
	// Reap it while we live, so a crash shows up as "exited" rather than as a
	// zombie that still answers kill(pid, 0).
	go func() {
		err := cmd.Wait()
		if err == nil {
			err = errors.New("exited with status 0")
		}
		exited.Store(c.name, err)
	}()
	return pid, nil
}

// checkExited returns an error when the named component died after start.
func (s *state) checkExited(name string) error {
	if v, ok := exited.Load(name); ok {
		return fmt.Errorf("%s %v; last log lines:\n%s", name, v, tail(s.logFile(name), 25))
	}
	return nil
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// alive returns the pid recorded for name when that process still runs the
// recorded binary, else 0.
func (s *state) alive(name string) int {
	b, err := os.ReadFile(s.pidFile(name))
	if err != nil {
		return 0
	}
	f := strings.SplitN(strings.TrimSpace(string(b)), "\n", 2)
	pid, err := strconv.Atoi(f[0])
	if err != nil || pid <= 0 {
		return 0
	}
	bin := ""
	if len(f) == 2 {
		bin = f[1]
	}
	if !procRuns(pid, bin) {
		return 0
	}
	return pid
}

// procRuns reports whether pid is a live (non-zombie) process whose argv[0]
// is bin (any binary when bin is empty).
func procRuns(pid int, bin string) bool {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	if i := strings.LastIndexByte(string(st), ')'); i > 0 && i+2 < len(st) && (st[i+2] == 'Z' || st[i+2] == 'X') {
		return false
	}
	if bin == "" {
		return true
	}
	cl, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	argv0, _, _ := strings.Cut(string(cl), "\x00")
	return argv0 == bin
}

// stop sends SIGTERM to the recorded process of name, then SIGKILL after
// grace, and removes its pid file.
func (s *state) stop(name string, grace time.Duration) error {
	pid := s.alive(name)
	defer os.Remove(s.pidFile(name))
	if pid == 0 {
		return nil
	}
	return killWait(pid, grace)
}

func killWait(pid int, grace time.Duration) error {
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("signal %d: %w", pid, err)
	}
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		if !procRuns(pid, "") {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	syscall.Kill(pid, syscall.SIGKILL)
	for i := 0; i < 50; i++ {
		if !procRuns(pid, "") {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("process %d survives SIGKILL", pid)
}

// findProcs lists pids whose command line satisfies match.
var findProcs = cluster.FindProcs
