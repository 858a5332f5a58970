// Package podindex names what the datapath's records carry: the pod
// holding an IP (every pod of the cluster) and the pod and container of a
// cgroup v2 id (pods on this node). One index serves every feature of the
// agent.
//
// The pod informer's handlers only record what changed under a write lock;
// lookups take the read lock. Cgroup ids are resolved lazily: a miss
// rescans the kubelet's pod cgroup directories under the cgroup v2 mount
// (at most once per MinRescan), and the scan's result is the cache.
package podindex

import (
	"context"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// MinRescan bounds cgroup rescans: a lookup that misses (a host process, a
// container started after the last scan) rescans at most this often.
const MinRescan = time.Second

// maxDepth bounds the cgroup walk: kubepods.slice/kubepods-burstable.slice/
// kubepods-burstable-pod<UID>.slice/cri-containerd-<ID>.scope is 4 deep
// under the root, plus the kubelet's own slice on kind nodes.
const maxDepth = 8

type podInfo struct {
	name       types.NamespacedName
	ips        []netip.Addr
	local      bool
	containers map[string]string // container ID (no runtime prefix) -> name
}

type cgEntry struct {
	uid       types.UID
	container string // container ID; "" for the pod's own cgroup
}

// Index is the agent-wide pod index.
type Index struct {
	node       string
	cgroupRoot string
	now        func() time.Time

	mu    sync.RWMutex
	byIP  map[netip.Addr]types.UID
	byUID map[types.UID]*podInfo

	synced     chan struct{} // closed once the informer has synced
	syncedOnce sync.Once

	scanMu   sync.Mutex // one scan at a time; never held with mu for writing long
	cgroups  map[uint64]cgEntry
	lastScan time.Time
}

// New returns an empty index for node, resolving cgroup ids under
// cgroupRoot (a cgroup v2 mount).
func New(node, cgroupRoot string) *Index {
	return &Index{node: node, cgroupRoot: cgroupRoot, now: time.Now, synced: make(chan struct{}),
		byIP: map[netip.Addr]types.UID{}, byUID: map[types.UID]*podInfo{}, cgroups: map[uint64]cgEntry{}}
}

// Run feeds the index from a pod informer until ctx ends; it returns once
// the informer has synced (or ctx ended) and keeps watching.
func (x *Index) Run(ctx context.Context, client kubernetes.Interface) {
	f := informers.NewSharedInformerFactory(client, 0)
	inf := f.Core().V1().Pods().Informer()
	// Keep only what the index reads: a large cluster's pods are much
	// bigger than their names, IPs and container IDs.
	inf.SetTransform(slim)
	inf.AddEventHandler(x)
	f.Start(ctx.Done())
	for _, ok := range f.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return
		}
	}
	x.syncedOnce.Do(func() { close(x.synced) })
}

// Synced is closed once the index holds every pod the API server had when
// Run started: from then on a miss means "not a pod", not "not yet".
func (x *Index) Synced() <-chan struct{} { return x.synced }

// slim strips a pod to the fields the index uses.
func slim(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	out := &corev1.Pod{}
	out.Name, out.Namespace, out.UID, out.ResourceVersion = p.Name, p.Namespace, p.UID, p.ResourceVersion
	out.Spec.NodeName, out.Spec.HostNetwork = p.Spec.NodeName, p.Spec.HostNetwork
	out.Status.Phase, out.Status.PodIPs, out.Status.PodIP = p.Status.Phase, p.Status.PodIPs, p.Status.PodIP
	strip := func(cs []corev1.ContainerStatus) []corev1.ContainerStatus {
		var o []corev1.ContainerStatus
		for _, c := range cs {
			o = append(o, corev1.ContainerStatus{Name: c.Name, ContainerID: c.ContainerID})
		}
		return o
	}
	out.Status.ContainerStatuses = strip(p.Status.ContainerStatuses)
	out.Status.InitContainerStatuses = strip(p.Status.InitContainerStatuses)
	out.Status.EphemeralContainerStatuses = strip(p.Status.EphemeralContainerStatuses)
	return out, nil
}

// OnAdd implements cache.ResourceEventHandler.
func (x *Index) OnAdd(obj any, _ bool) { x.set(obj) }

// OnUpdate implements cache.ResourceEventHandler.
func (x *Index) OnUpdate(_, obj any) { x.set(obj) }

// OnDelete implements cache.ResourceEventHandler.
func (x *Index) OnDelete(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	x.removeLocked(p.UID)
}

func (x *Index) set(obj any) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	info := &podInfo{name: types.NamespacedName{Namespace: p.Namespace, Name: p.Name}, local: p.Spec.NodeName == x.node}
	// A finished pod's IP may already belong to a new pod; a hostNetwork
	// pod's IP is the node's.
	if !p.Spec.HostNetwork && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
		for _, ip := range p.Status.PodIPs {
			if a, err := netip.ParseAddr(ip.IP); err == nil {
				info.ips = append(info.ips, a.Unmap())
			}
		}
	}
	if info.local {
		info.containers = map[string]string{}
		for _, list := range [][]corev1.ContainerStatus{p.Status.InitContainerStatuses, p.Status.ContainerStatuses, p.Status.EphemeralContainerStatuses} {
			for _, c := range list {
				// "containerd://<id>", "cri-o://<id>", "docker://<id>".
				if _, id, ok := strings.Cut(c.ContainerID, "://"); ok && id != "" {
					info.containers[id] = c.Name
				}
			}
		}
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	x.removeLocked(p.UID)
	x.byUID[p.UID] = info
	for _, a := range info.ips {
		x.byIP[a] = p.UID
	}
}

func (x *Index) removeLocked(uid types.UID) {
	old := x.byUID[uid]
	if old == nil {
		return
	}
	for _, a := range old.ips {
		// Only if still ours: a new pod may hold the IP already.
		if x.byIP[a] == uid {
			delete(x.byIP, a)
		}
	}
	delete(x.byUID, uid)
}

// PodByIP names the pod (not hostNetwork, not finished) holding ip.
func (x *Index) PodByIP(ip netip.Addr) (types.NamespacedName, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	if p := x.byUID[x.byIP[ip.Unmap()]]; p != nil {
		return p.name, true
	}
	return types.NamespacedName{}, false
}

// PodByCgroup names the pod and container whose cgroup v2 directory has
// inode id, for pods on this node. container is "" for the pod's own
// cgroup or a container the pod's status does not list yet.
func (x *Index) PodByCgroup(id uint64) (types.NamespacedName, string, bool) {
	p, c, _, ok := x.PodByCgroupIPs(id)
	return p, c, ok
}

// PodByCgroupIPs is PodByCgroup plus the pod's IPs (none for a
// hostNetwork pod): a connect() from that cgroup leaves from one of them.
func (x *Index) PodByCgroupIPs(id uint64) (types.NamespacedName, string, []netip.Addr, bool) {
	if id == 0 {
		return types.NamespacedName{}, "", nil, false
	}
	x.scanMu.Lock()
	e, ok := x.cgroups[id]
	if !ok && x.now().Sub(x.lastScan) >= MinRescan {
		x.cgroups, x.lastScan = scan(x.cgroupRoot), x.now()
		e, ok = x.cgroups[id]
	}
	x.scanMu.Unlock()
	if !ok {
		return types.NamespacedName{}, "", nil, false
	}
	x.mu.RLock()
	defer x.mu.RUnlock()
	p := x.byUID[e.uid]
	if p == nil {
		return types.NamespacedName{}, "", nil, false
	}
	// p.ips is replaced, never modified, by set: safe to hand out.
	return p.name, p.containers[e.container], p.ips, true
}

// Pod cgroup directory names: cgroupfs "pod<UID>", systemd
// "kubepods-<qos>-pod<UID with _ for ->.slice".
var podDir = regexp.MustCompile(`pod([0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12})(\.slice)?$`)

// Container directories: cgroupfs "<ID>", systemd "<runtime>-<ID>.scope".
var containerDir = regexp.MustCompile(`(?:^|-)([0-9a-f]{64})(\.scope)?$`)

// scan maps the inode of every pod and container cgroup directory under
// root to its pod UID and container ID.
func scan(root string) map[uint64]cgEntry {
	out := map[uint64]cgEntry{}
	base := strings.Count(filepath.Clean(root), string(filepath.Separator))
	filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil // vanished cgroups are normal
		}
		if strings.Count(path, string(filepath.Separator))-base >= maxDepth {
			return filepath.SkipDir
		}
		m := podDir.FindStringSubmatch(d.Name())
		if m == nil {
			return nil
		}
		uid := types.UID(strings.ReplaceAll(m[1], "_", "-"))
		if ino, ok := inode(path); ok {
			out[ino] = cgEntry{uid: uid}
		}
		ents, _ := os.ReadDir(path)
		for _, c := range ents {
			if !c.IsDir() {
				continue
			}
			cm := containerDir.FindStringSubmatch(c.Name())
			if cm == nil {
				continue
			}
			if ino, ok := inode(filepath.Join(path, c.Name())); ok {
				out[ino] = cgEntry{uid: uid, container: cm[1]}
			}
		}
		return filepath.SkipDir
	})
	return out
}

func inode(path string) (uint64, bool) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return st.Ino, true
}
