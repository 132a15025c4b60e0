//! The two-zone layout, built for real in network namespaces: clients in
//! `public`, the gateway in `dmz` with one leg in each zone, the nodes in
//! `internal`. Real `lumbung node` and `lumbung gateway` processes run in
//! them; the test shows that clients reach S3 through the gateway and
//! nothing else, that the gateway forwards no packets and has no route it
//! does not need, and that a process inside the internal zone without a
//! certificate of the cluster CA is refused by every node.
//!
//! Needs root (`ip netns`); every namespace is created and removed here.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use common::run;
use lumbung::admin::S3Env;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PUBLIC_GATEWAY: &str = "10.99.1.1";
const PUBLIC_CLIENT: &str = "10.99.1.10";
const INTERNAL_GATEWAY: &str = "10.99.2.1";
const NODES: [&str; 3] = ["10.99.2.11", "10.99.2.12", "10.99.2.13"];
const BASE_PORT: u16 = 7480;

fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// The three zones, and the processes started in them; all are removed
/// when dropped, processes by PID first.
struct Zones {
    public: String,
    dmz: String,
    internal: String,
    processes: Vec<Child>,
}

impl Zones {
    fn build() -> Zones {
        let tag = std::process::id();
        let z = Zones {
            public: format!("lb-public-{tag}"),
            dmz: format!("lb-dmz-{tag}"),
            internal: format!("lb-internal-{tag}"),
            processes: Vec::new(),
        };
        for ns in [&z.public, &z.dmz, &z.internal] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // Each zone is a bridge; the gateway plugs one leg into each.
        for (zone, leg, gateway_addr) in [
            (&z.public, "pub0", PUBLIC_GATEWAY),
            (&z.internal, "int0", INTERNAL_GATEWAY),
        ] {
            ip(&["-n", zone, "link", "add", "br0", "type", "bridge"]);
            ip(&["-n", zone, "link", "set", "br0", "up"]);
            ip(&[
                "-n", &z.dmz, "link", "add", leg, "type", "veth", "peer", "name", "gw0", "netns",
                zone,
            ]);
            ip(&["-n", zone, "link", "set", "gw0", "master", "br0"]);
            ip(&["-n", zone, "link", "set", "gw0", "up"]);
            ip(&[
                "-n",
                &z.dmz,
                "addr",
                "add",
                &format!("{gateway_addr}/24"),
                "dev",
                leg,
            ]);
            ip(&["-n", &z.dmz, "link", "set", leg, "up"]);
        }
        ip(&[
            "-n",
            &z.public,
            "addr",
            "add",
            &format!("{PUBLIC_CLIENT}/24"),
            "dev",
            "br0",
        ]);
        for node in NODES {
            ip(&[
                "-n",
                &z.internal,
                "addr",
                "add",
                &format!("{node}/24"),
                "dev",
                "br0",
            ]);
        }
        // The DMZ never forwards. A client that points its default route
        // at the gateway (as an attacker would) still gets nowhere.
        run(
            "ip",
            &[
                "netns",
                "exec",
                &z.dmz,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=0",
            ],
        );
        ip(&[
            "-n",
            &z.public,
            "route",
            "add",
            "default",
            "via",
            PUBLIC_GATEWAY,
        ]);
        z
    }

    fn spawn(&mut self, ns: &str, args: &[&str], log: &Path) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_lumbung")])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        self.processes.push(child);
    }
}

impl Drop for Zones {
    fn drop(&mut self) {
        // `ip netns exec` execs the program, so each PID is lumbung's own.
        for p in &mut self.processes {
            let _ = p.kill();
            let _ = p.wait();
        }
        for ns in [&self.public, &self.dmz, &self.internal] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread that has entered namespace `ns`: every socket it
/// opens belongs to that zone.
fn in_zone<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let handle = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
            // SAFETY: setns on this thread only, with a namespace fd we hold.
            let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

fn init_cluster(dir: &Path) -> S3Env {
    let nodes = NODES.join(",");
    run(
        env!("CARGO_BIN_EXE_lumbung"),
        &[
            "admin",
            "init-cluster",
            "--nodes",
            "3",
            "--shards",
            "4",
            "--dir",
            dir.to_str().unwrap(),
            "--base-port",
            &BASE_PORT.to_string(),
            "--host",
            INTERNAL_GATEWAY,
            "--node-hosts",
            &nodes,
            "--public-host",
            PUBLIC_GATEWAY,
        ],
    );
    S3Env::parse(&std::fs::read_to_string(dir.join("s3.env")).unwrap()).unwrap()
}

/// `lumbung admin status --json` run inside `ns` with `admin.toml`: how
/// many nodes answered, and the errors of those that did not.
fn status_from(ns: &str, admin: &Path) -> (usize, Vec<String>) {
    let out = run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_lumbung"),
            "admin",
            "--config",
            admin.to_str().unwrap(),
            "--json",
            "status",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    let up = nodes.iter().filter(|n| n["up"] == true).count();
    let errors = nodes
        .iter()
        .filter_map(|n| n["error"].as_str().map(str::to_string))
        .collect();
    (up, errors)
}

#[test]
fn public_clients_reach_only_the_gateway_and_only_cluster_peers_reach_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let env = init_cluster(&dir);
    let mut zones = Zones::build();
    let (internal, dmz, public) = (
        zones.internal.clone(),
        zones.dmz.clone(),
        zones.public.clone(),
    );
    for i in 1..=3 {
        let config = dir.join(format!("node{i}.toml"));
        let log = tmp.path().join(format!("node{i}.log"));
        zones.spawn(
            &internal,
            &["node", "--config", config.to_str().unwrap()],
            &log,
        );
    }
    let gateway_config = dir.join("gateway.toml");
    zones.spawn(
        &dmz,
        &["gateway", "--config", gateway_config.to_str().unwrap()],
        &tmp.path().join("gateway.log"),
    );

    // The gateway's only routes are its two zones; it forwards nothing.
    let routes = ip(&["-n", &dmz, "route", "show"]);
    let routes: Vec<&str> = routes.lines().collect();
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert!(routes
        .iter()
        .any(|r| r.starts_with("10.99.1.0/24 dev pub0")));
    assert!(routes
        .iter()
        .any(|r| r.starts_with("10.99.2.0/24 dev int0")));
    let forward = run(
        "ip",
        &["netns", "exec", &dmz, "sysctl", "-n", "net.ipv4.ip_forward"],
    );
    assert_eq!(forward.trim(), "0");

    // A client in the public zone: S3 through the gateway works...
    let body = common::bytes(7, 300_000);
    let node_addrs: Vec<SocketAddr> = NODES
        .iter()
        .zip(1..)
        .map(|(h, i)| format!("{h}:{}", BASE_PORT + i).parse().unwrap())
        .collect();
    in_zone(&public, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = common::s3(&env);
            let deadline = Instant::now() + Duration::from_secs(60);
            // The bootstrap bucket, not just the key: the key exists first.
            while c.head_bucket().bucket("demo").send().await.is_err() {
                assert!(Instant::now() < deadline, "the gateway never served S3");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            c.put_object()
                .bucket("demo")
                .key("from-public")
                .body(ByteStream::from(body.clone()))
                .send()
                .await
                .unwrap();
            let got = c
                .get_object()
                .bucket("demo")
                .key("from-public")
                .send()
                .await
                .unwrap();
            assert!(got.body.collect().await.unwrap().into_bytes() == body);
        });
        // ...and no node can even be connected to, routed or not.
        for addr in &node_addrs {
            let r = TcpStream::connect_timeout(addr, Duration::from_secs(2));
            assert!(r.is_err(), "a public client connected to node {addr}");
        }
    });

    // Inside the internal zone, the cluster's admin certificate is
    // answered by every node; a certificate of another CA by none.
    let (up, _) = status_from(&internal, &dir.join("admin.toml"));
    assert_eq!(up, 3);
    let forged_dir = tmp.path().join("forged");
    init_cluster(&forged_dir);
    // The intruder trusts the real CA (it knows who the nodes are) but can
    // only present a certificate of its own CA.
    let mut intruder: lumbung::config::AdminConfig =
        lumbung::config::load(&forged_dir.join("admin.toml")).unwrap();
    intruder.tls.ca = dir.join("ca.pem");
    let intruder_toml = forged_dir.join("intruder.toml");
    std::fs::write(&intruder_toml, toml::to_string(&intruder).unwrap()).unwrap();
    let (up, errors) = status_from(&internal, &intruder_toml);
    assert_eq!(up, 0, "a node answered a certificate of another CA");
    assert_eq!(errors.len(), 3);
    for e in &errors {
        // The handshake fails (an alert, or the node closing it): no RPC
        // is ever answered, not even with a refusal.
        assert!(
            e.starts_with("transport error") || e.contains("operation was canceled"),
            "{e}"
        );
    }
    println!("a foreign certificate inside the internal zone: {errors:?}");
    drop(zones);
}
