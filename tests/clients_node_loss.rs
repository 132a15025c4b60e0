//! Real clients with their default retries keep working when a node dies
//! under them: `aws s3 cp` (multipart) and `rclone copy` run while node 2
//! stops, both finish, and everything they wrote reads back.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The first aws-cli that runs: Debian's, the harness venv's, or PATH's.
fn aws_binary() -> PathBuf {
    ["/usr/bin/aws", "/opt/s3harness-venv/bin/aws", "aws"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("aws-cli is installed (tests/acceptance/clients/install.sh)")
}

/// A command without the machine's ambient CA and AWS settings, which
/// would change what the client trusts (AWS_CA_BUNDLE breaks rclone).
fn clean(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "AWS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "RCLONE_CA_CERT",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn aws(env: &lumbung::admin::S3Env, work: &Path, args: &[&str]) -> Command {
    let config = work.join("aws.config");
    std::fs::write(
        &config,
        format!(
            "[default]\nregion = {}\ns3 =\n    addressing_style = path\n",
            env.region
        ),
    )
    .unwrap();
    let mut cmd = clean(aws_binary());
    cmd.arg("--endpoint-url")
        .arg(&env.endpoint)
        .args(args)
        .env("AWS_CONFIG_FILE", &config)
        .env("AWS_SHARED_CREDENTIALS_FILE", work.join("none"))
        .env("AWS_ACCESS_KEY_ID", &env.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &env.secret_key)
        .env("AWS_DEFAULT_REGION", &env.region)
        .env("AWS_CA_BUNDLE", &env.ca_cert)
        .env("AWS_EC2_METADATA_DISABLED", "true");
    cmd
}

fn rclone(env: &lumbung::admin::S3Env, work: &Path, args: &[&str]) -> Command {
    let config = work.join("rclone.conf");
    std::fs::write(&config, "").unwrap();
    let mut cmd = clean("rclone");
    cmd.args(args)
        .env("RCLONE_CONFIG", &config)
        .env("RCLONE_CONFIG_LB_TYPE", "s3")
        .env("RCLONE_CONFIG_LB_PROVIDER", "Other")
        .env("RCLONE_CONFIG_LB_ENV_AUTH", "false")
        .env("RCLONE_CONFIG_LB_ACCESS_KEY_ID", &env.access_key)
        .env("RCLONE_CONFIG_LB_SECRET_ACCESS_KEY", &env.secret_key)
        .env("RCLONE_CONFIG_LB_ENDPOINT", &env.endpoint)
        .env("RCLONE_CONFIG_LB_REGION", &env.region)
        .env("RCLONE_CONFIG_LB_FORCE_PATH_STYLE", "true")
        .env("RCLONE_CA_CERT", &env.ca_cert)
        .env("RCLONE_CACHE_DIR", work.join("rclone-cache"));
    cmd
}

/// Waits for `child` up to `limit`; its exit status and how long it ran.
fn finish(mut child: Child, name: &str, started: Instant, limit: Duration) -> Duration {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{name} failed: {status}");
            return started.elapsed();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{name} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aws_cli_and_rclone_finish_their_jobs_while_a_node_dies() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = common::cluster(tmp.path(), 8).await;
    let env = cluster.env.clone();
    let work = tmp.path().join("work");
    let tree = work.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let big = common::bytes(42, 96 << 20);
    std::fs::write(work.join("big.bin"), &big).unwrap();
    for i in 0..300u64 {
        std::fs::write(
            tree.join(format!("f{i:03}")),
            common::bytes(i, 1000 + (i as usize * 97) % 20_000),
        )
        .unwrap();
    }

    let started = Instant::now();
    let big_path = work.join("big.bin");
    let cp = aws(
        &env,
        &work,
        &[
            "s3",
            "cp",
            "--quiet",
            big_path.to_str().unwrap(),
            "s3://demo/loss/big.bin",
        ],
    )
    .spawn()
    .unwrap();
    let copy = rclone(
        &env,
        &work,
        &["copy", tree.to_str().unwrap(), "lb:demo/loss/tree"],
    )
    .spawn()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.stop_node(2).await;
    let stopped_at = started.elapsed();

    let limit = Duration::from_secs(300);
    let (cp_took, copy_took) = tokio::task::spawn_blocking(move || {
        (
            finish(cp, "aws s3 cp", started, limit),
            finish(copy, "rclone copy", started, limit),
        )
    })
    .await
    .unwrap();
    println!(
        "node 2 stopped at {stopped_at:?}; aws s3 cp (96 MiB, multipart) done at {cp_took:?}, rclone copy (300 files) at {copy_took:?}"
    );

    // Everything reads back, through the two nodes left.
    let c = common::s3(&env);
    let got = c
        .get_object()
        .bucket("demo")
        .key("loss/big.bin")
        .send()
        .await
        .unwrap();
    assert!(got.body.collect().await.unwrap().into_bytes() == big);
    for i in 0..300u64 {
        let got = c
            .get_object()
            .bucket("demo")
            .key(format!("loss/tree/f{i:03}"))
            .send()
            .await
            .unwrap();
        let want = common::bytes(i, 1000 + (i as usize * 97) % 20_000);
        assert!(
            got.body.collect().await.unwrap().into_bytes() == want,
            "f{i:03}"
        );
    }
    cluster.stop().await;
}
