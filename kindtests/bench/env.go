//go:build linux

package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Addresses live only on the veth pair inside our two namespaces. The
// service range is routed (inside the client namespace only) onto that veth
// so connect() gets past the routing decision and kube-proxy's OUTPUT DNAT
// can act, and the backend namespace answers any untranslated SYN with a RST:
// a Service that is not programmed yet fails fast instead of hanging.
const (
	clientIP    = "10.123.0.1"
	backendIP   = "10.123.0.2"
	backendPort = 8080
	// backendIPs are 10.123.0.2 .. 10.123.0.(1+backendIPs) in the backend
	// netns; the scale and bulk Services use the first spreadIPs of them, the
	// churn Service the last two (.30, .31).
	backendIPs  = 30
	spreadIPs   = 24
	serviceCIDR = "10.124.0.0/14"
	apiPort     = 16443
	etcdPort    = 23790
	etcdPeer    = 23800
	nodeName    = "kebpf-bench-node"
	cgroupRoot  = "/sys/fs/cgroup/unified"
	namePrefix  = "kebpf-bench-"
)

// env is one run's private world: two netns, a veth, a test cgroup, a bpffs,
// a temp dir and every process started in them. close removes all of it.
type env struct {
	log     *slog.Logger
	id      string
	dir     string // temp dir (logs, configs)
	dataDir string // etcd data on tmpfs
	nsC     string // client/control netns: etcd, apiserver, kube-proxy, agent, client
	nsB     string // backend netns
	cgroup  string
	cgFD    *os.File
	bpffs   string
	self    string // this executable, re-run for child roles

	mu    sync.Mutex
	procs map[string]*proc
	undo  []func() error
}

type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	in   io.WriteCloser // workers only
	out  *bufio.Reader
}

func randID() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func run(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}

// newRunEnv is how every table's environment starts: a new run id, its
// temp dir and one netns per suffix (netns(suffix) names it), each removed
// at close. On error what was made is already removed.
func newRunEnv(ctx context.Context, log *slog.Logger, netnsSuffixes ...string) (_ *env, err error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable: %w", err)
	}
	e := &env{log: log, id: randID(), self: self, procs: map[string]*proc{}}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	if e.dir, err = os.MkdirTemp("", namePrefix+e.id+"-"); err != nil {
		return nil, err
	}
	e.undo = append(e.undo, func() error { return os.RemoveAll(e.dir) })
	for _, s := range netnsSuffixes {
		ns := e.netns(s)
		if err := run(ctx, "ip", "netns", "add", ns); err != nil {
			return nil, err
		}
		e.undo = append(e.undo, func() error { return run(context.Background(), "ip", "netns", "del", ns) })
	}
	return e, nil
}

// netns names the run's netns with suffix.
func (e *env) netns(suffix string) string { return namePrefix + e.id + suffix }

// newEnv builds the namespaces, veth, cgroup and bpffs. On error everything
// made so far is already removed.
func newEnv(ctx context.Context, log *slog.Logger) (_ *env, err error) {
	e, err := newRunEnv(ctx, log, "-c", "-b")
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	id := e.id
	e.nsC, e.nsB = e.netns("-c"), e.netns("-b")
	// etcd on tmpfs: fsync on a VM disk would make the API server, not the
	// datapaths, the thing measured.
	if e.dataDir, err = os.MkdirTemp("/dev/shm", namePrefix+id+"-"); err != nil {
		return nil, err
	}
	e.undo = append(e.undo, func() error { return os.RemoveAll(e.dataDir) })
	vc, vb := "kbc"+id, "kbb"+id
	steps := [][]string{
		{"link", "add", vc, "netns", e.nsC, "type", "veth", "peer", "name", vb, "netns", e.nsB},
		{"-n", e.nsC, "link", "set", "lo", "up"},
		{"-n", e.nsC, "link", "set", vc, "up"},
		{"-n", e.nsC, "addr", "add", clientIP + "/24", "dev", vc},
		{"-n", e.nsC, "route", "add", serviceCIDR, "via", backendIP, "dev", vc},
		{"-n", e.nsB, "link", "set", "lo", "up"},
		{"-n", e.nsB, "link", "set", vb, "up"},
		{"-n", e.nsB, "addr", "add", backendIP + "/24", "dev", vb},
	}
	for i := 1; i < backendIPs; i++ {
		steps = append(steps, []string{"-n", e.nsB, "addr", "add", fmt.Sprintf("10.123.0.%d/32", 2+i), "dev", vb})
	}
	for _, s := range steps {
		if err := run(ctx, "ip", s...); err != nil {
			return nil, err
		}
	}
	rst := filepath.Join(e.dir, "backend.nft")
	if err := os.WriteFile(rst, []byte(fmt.Sprintf(`table inet kebpf_bench {
	chain pre {
		type filter hook prerouting priority raw; policy accept;
		ip daddr %s tcp flags & (syn | ack) == syn reject with tcp reset
	}
}
`, serviceCIDR)), 0o644); err != nil {
		return nil, err
	}
	if err := run(ctx, "ip", "netns", "exec", e.nsB, "nft", "-f", rst); err != nil {
		return nil, err
	}

	e.cgroup = filepath.Join(cgroupRoot, namePrefix+id)
	if e.cgFD, err = e.makeCgroup(e.cgroup); err != nil {
		return nil, err
	}

	if err := e.mountBPFFS(); err != nil {
		return nil, err
	}
	log.Info("bench environment ready", "id", id, "clientNetns", e.nsC, "backendNetns", e.nsB, "cgroup", e.cgroup)
	return e, nil
}

// makeCgroup creates the cgroup v2 directory path, removed at teardown
// (a child made later goes first), and opens it for CLONE_INTO_CGROUP.
func (e *env) makeCgroup(path string) (*os.File, error) {
	if err := os.Mkdir(path, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup: %w", err)
	}
	e.undo = append(e.undo, func() error { return removeCgroup(path) })
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open cgroup: %w", err)
	}
	e.undo = append(e.undo, f.Close)
	return f, nil
}

// removeCgroup retries: a killed process leaves the cgroup a moment after
// its parent reaped it.
func removeCgroup(path string) error {
	var err error
	for i := 0; i < 50; i++ {
		if err = os.Remove(path); err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("remove cgroup %s: %w", path, err)
}

type startOpts struct {
	netns  string   // "" = host netns
	ipExec bool     // use `ip netns exec` (fresh /sys) rather than nsenter
	cgroup *os.File // start inside this cgroup (CLONE_INTO_CGROUP); nil: the harness's
	env    []string
	extra  []*os.File
	stdin  bool
}

// start launches a process in its own process group with output in
// <dir>/<name>.log.
func (e *env) start(name string, o startOpts, bin string, args ...string) (*proc, error) {
	argv := append([]string{bin}, args...)
	if o.netns != "" {
		if o.ipExec {
			argv = append([]string{"ip", "netns", "exec", o.netns}, argv...)
		} else {
			argv = append([]string{"nsenter", "--net=/run/netns/" + o.netns, "--"}, argv...)
		}
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	logf, err := os.Create(filepath.Join(e.dir, name+".log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd.Stderr = logf
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	if o.stdin {
		if p.in, err = cmd.StdinPipe(); err != nil {
			return nil, err
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			return nil, err
		}
		p.out = bufio.NewReader(out)
	} else {
		cmd.Stdout = logf
	}
	cmd.Env = append(os.Environ(), o.env...)
	cmd.ExtraFiles = o.extra
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if o.cgroup != nil {
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = int(o.cgroup.Fd())
	}
	return p, e.launch(p)
}

func (e *env) launch(p *proc) error {
	if err := p.cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", p.name, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	e.mu.Lock()
	e.procs[p.name] = p
	e.mu.Unlock()
	return nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the process group, then SIGKILL after grace.
func (e *env) stop(name string, grace time.Duration) {
	e.mu.Lock()
	p := e.procs[name]
	delete(e.procs, name)
	e.mu.Unlock()
	if p == nil {
		return
	}
	_ = syscall.Kill(-p.pid(), syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
		<-p.done
	}
}

func (e *env) logTail(name string) string {
	b, _ := os.ReadFile(filepath.Join(e.dir, name+".log"))
	if len(b) > 1500 {
		b = b[len(b)-1500:]
	}
	return string(b)
}

// close stops every process (newest first is not needed: each is independent
// once the API server is gone) and undoes every step, reporting what failed.
func (e *env) close() error {
	e.mu.Lock()
	names := make([]string, 0, len(e.procs))
	for n := range e.procs {
		names = append(names, n)
	}
	e.mu.Unlock()
	// The agent first: it detaches on SIGTERM while its API server is alive.
	for _, first := range []string{"socklb-agent", "worker-socklb"} {
		e.stop(first, 10*time.Second)
	}
	for _, n := range names {
		e.stop(n, 10*time.Second)
	}
	var errs []error
	for i := len(e.undo) - 1; i >= 0; i-- {
		if err := e.undo[i](); err != nil {
			errs = append(errs, err)
		}
	}
	e.undo = nil
	if err := errors.Join(errs...); err != nil {
		e.log.Warn("teardown incomplete", "err", err)
		return err
	}
	e.log.Info("bench environment removed", "id", e.id)
	return nil
}

// Leftovers lists what a run with this id (or any run, id "") left behind:
// netns, cgroups, processes. The smoke test requires it to be empty.
func Leftovers(id string) []string {
	var out []string
	prefix := namePrefix + id
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, d := range ents {
			if strings.HasPrefix(d.Name(), prefix) {
				out = append(out, "netns "+d.Name())
			}
		}
	}
	if ents, err := os.ReadDir(cgroupRoot); err == nil {
		for _, d := range ents {
			if strings.HasPrefix(d.Name(), prefix) {
				out = append(out, "cgroup "+d.Name())
			}
		}
	}
	if ents, err := os.ReadDir("/proc"); err == nil {
		for _, d := range ents {
			b, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
			if err != nil {
				continue
			}
			if bytes.Contains(b, []byte(prefix)) && d.Name() != fmt.Sprint(os.Getpid()) {
				out = append(out, "process "+d.Name()+" "+strings.ReplaceAll(string(b), "\x00", " "))
			}
		}
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, prefix) {
				out = append(out, "mount "+l)
			}
		}
	}
	return out
}

// rssKB reads VmRSS of pid (kB).
func rssKB(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			var v int64
			fmt.Sscanf(strings.TrimSpace(strings.TrimPrefix(l, "VmRSS:")), "%d", &v)
			return v
		}
	}
	return 0
}

// mountBPFFS mounts a private bpffs at e.bpffs: the run's pins never meet
// the host's, and teardown unmounts it with everything pinned there.
func (e *env) mountBPFFS() error {
	e.bpffs = filepath.Join(e.dir, "bpffs")
	if err := os.Mkdir(e.bpffs, 0o700); err != nil {
		return err
	}
	if err := unix.Mount("bpf", e.bpffs, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount private bpffs: %w", err)
	}
	e.undo = append(e.undo, func() error { return unix.Unmount(e.bpffs, unix.MNT_DETACH) })
	return nil
}
