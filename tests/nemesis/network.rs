//! The nemesis's network and disks.
//!
//! A hub namespace holds a bridge, the gateway and the test's own clients
//! (the test thread enters it before starting its runtime, so every socket
//! of the test lives there). Each node has a namespace of its own, joined
//! to the bridge by a veth pair; taking the hub's end of a pair down cuts
//! that node off from everyone, as a pulled cable would: its packets are
//! dropped, nothing is refused. Nothing here touches the host's own
//! namespace: the veths are created inside the namespaces.
//!
//! A node's data directory can live on a small tmpfs of its own, which a
//! filler file fills up to make its disk full.

use crate::common::run;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The gateway's address on the bridge; the clients live here too.
pub const HUB_ADDR: &str = "10.77.0.1";

/// Node `id`'s address on the bridge.
pub fn node_addr(id: usize) -> String {
    format!("10.77.0.{}", 10 + id)
}

/// The hub and one namespace per node; every namespace (and with it every
/// veth) is removed when dropped, also after a failure half-way.
pub struct Network {
    /// The hub namespace: bridge, gateway, clients.
    pub hub: String,
    /// Node `i + 1`'s namespace.
    nodes: Vec<String>,
}

impl Network {
    /// Builds the hub and `nodes` node namespaces, each node plugged in.
    pub fn build(nodes: usize) -> Network {
        remove_leftovers();
        let tag = std::process::id();
        let net = Network {
            hub: format!("nemesis-hub-{tag}"),
            nodes: (1..=nodes).map(|i| format!("nemesis-n{i}-{tag}")).collect(),
        };
        let hub = net.hub.as_str();
        run("ip", &["netns", "add", hub]);
        run("ip", &["-n", hub, "link", "set", "lo", "up"]);
        run("ip", &["-n", hub, "link", "add", "br0", "type", "bridge"]);
        run(
            "ip",
            &[
                "-n",
                hub,
                "addr",
                "add",
                &format!("{HUB_ADDR}/24"),
                "dev",
                "br0",
            ],
        );
        run("ip", &["-n", hub, "link", "set", "br0", "up"]);
        for (i, ns) in net.nodes.iter().enumerate() {
            let id = i + 1;
            let cable = format!("n{id}");
            run("ip", &["netns", "add", ns]);
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
            run(
                "ip",
                &[
                    "-n", hub, "link", "add", &cable, "type", "veth", "peer", "name", "eth0",
                    "netns", ns,
                ],
            );
            run("ip", &["-n", hub, "link", "set", &cable, "master", "br0"]);
            run("ip", &["-n", hub, "link", "set", &cable, "up"]);
            let addr = format!("{}/24", node_addr(id));
            run("ip", &["-n", ns, "addr", "add", &addr, "dev", "eth0"]);
            run("ip", &["-n", ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    /// Node `id`'s namespace.
    pub fn node_ns(&self, id: usize) -> &str {
        &self.nodes[id - 1]
    }

    /// Cuts node `id` off: the hub's end of its cable goes down.
    pub fn unplug(&self, id: usize) {
        run(
            "ip",
            &["-n", &self.hub, "link", "set", &format!("n{id}"), "down"],
        );
    }

    /// Plugs node `id` back in.
    pub fn plug(&self, id: usize) {
        run(
            "ip",
            &["-n", &self.hub, "link", "set", &format!("n{id}"), "up"],
        );
    }

    /// Moves the calling thread into the hub: sockets it opens, and threads
    /// and processes it starts from now on, belong to the hub's network.
    pub fn enter_hub(&self) {
        let handle = std::fs::File::open(format!("/var/run/netns/{}", self.hub)).unwrap();
        // SAFETY: setns on this thread only, with a namespace fd we hold.
        let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain([&self.hub]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Removes the namespaces of earlier runs whose test process is gone (it
/// was killed, so no Drop ran) and in which nothing runs any more.
fn remove_leftovers() {
    for line in run("ip", &["netns", "list"]).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = ns
            .strip_prefix("nemesis-")
            .and_then(|r| r.rsplit('-').next())
        else {
            continue;
        };
        let gone = !Path::new("/proc").join(pid).exists();
        if gone && run("ip", &["netns", "pids", ns]).trim().is_empty() {
            println!("removing namespace {ns}, left by a test that was killed");
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A size-limited tmpfs mounted on a node's data directory; unmounted when
/// dropped (after the node's process is gone).
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on `path` (created if missing).
    pub fn mount(path: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let size = format!("size={mib}m");
        run(
            "mount",
            &["-t", "tmpfs", "-o", &size, "tmpfs", path.to_str().unwrap()],
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    fn filler(&self) -> PathBuf {
        self.path.join("nemesis-filler")
    }

    /// Bytes still free on the file system.
    pub fn free_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.path.to_str().unwrap()).unwrap();
        // SAFETY: statvfs fills the struct we pass; the path is a C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs: {}", std::io::Error::last_os_error());
        st.f_bavail * st.f_frsize
    }

    /// Takes all but `leave` bytes with a filler file; returns its size.
    pub fn fill(&self, leave: u64) -> u64 {
        let size = self.free_bytes().saturating_sub(leave);
        let file = std::fs::File::create(self.filler()).unwrap();
        // A sparse file would take nothing: allocate the pages.
        // SAFETY: fallocate on a file we opened for writing.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
        assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
        size
    }

    /// Gives the filler's space back.
    pub fn unfill(&self) {
        let _ = std::fs::remove_file(self.filler());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        self.unfill();
        let path = self.path.to_str().unwrap();
        let unmounted = Command::new("umount").arg(path).status();
        if !unmounted.is_ok_and(|s| s.success()) {
            // Still busy (a process not yet reaped): detach it now, the
            // kernel frees it with the last user.
            let _ = Command::new("umount").args(["-l", path]).status();
        }
    }
}
