//! Private Garage servers for fault tests: a test that stops, kills or restarts a storage must
//! never touch the shared rig servers (every other test uses them in parallel), so it starts
//! its own single-node Garage here, configured the way `scripts/lib/garage.sh` does it (free
//! ports, fresh data dir, sqlite, `replication_factor = 1`).
//!
//! ```ignore
//! let dir = tempdir();
//! let mut secondary = Garage::start(&dir.path().join("secondary"), "fra1");
//! let storage = Storage::new(rig().primary.clone(), secondary.side());
//! storage.mkdir("secondary:dst");
//! secondary.kill();     // the storage crashes
//! secondary.restart();  // same config, data dir, ports and keys
//! ```
//!
//! [`Storage`] is the raw rclone view (remotes `primary:` and `secondary:`) of any two sides,
//! and [`policy_with`] writes a policy like [`super::s3_policy_with`] for any two sides.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{Buckets, Side};

/// `n` distinct free TCP ports on 127.0.0.1: every listener is held until all are picked.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn random_hex(bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < bytes * 2 {
        write!(s, "{:016x}", super::random_u64()).unwrap();
    }
    s.truncate(bytes * 2);
    s
}

/// One single-node Garage server owned by a test. Dropping it kills the server (SIGKILL); its
/// directory belongs to the caller (usually inside the test's [`super::tempdir`]).
#[derive(Debug)]
pub struct Garage {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub region: String,
    pub endpoint: String,
    pub s3_port: u16,
    pub key_id: String,
    pub secret: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Garage {
    /// Configures and starts a fresh server in `dir` (created; it must not hold another
    /// server) with S3 region `region`: layout applied, and a key that may create buckets.
    /// About 2 s.
    pub fn start(dir: &Path, region: &str) -> Garage {
        std::fs::create_dir_all(dir.join("meta")).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let ports = free_ports(3);
        let (rpc, s3, admin) = (ports[0], ports[1], ports[2]);
        let config = dir.join("garage.toml");
        let toml = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
             replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\n\
             [s3_api]\ns3_region = \"{region}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
             root_domain = \".s3.garage.localhost\"\n\n\
             [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\nadmin_token = \"{token}\"\n",
            d = dir.display(),
            secret = random_hex(32),
            token = random_hex(24),
        );
        super::write_private(&config, toml.as_bytes());
        let mut g = Garage {
            dir: dir.to_path_buf(),
            config,
            region: region.to_string(),
            endpoint: format!("http://127.0.0.1:{s3}"),
            s3_port: s3,
            key_id: String::new(),
            secret: String::new(),
            log: dir.join("server.log"),
            child: None,
        };
        let node_id = g.launch();
        g.cli_ok(&["layout", "assign", "-z", "dc1", "-c", "1G", &node_id]);
        g.cli_ok(&["layout", "apply", "--version", "1"]);
        let out = g.cli_ok(&["key", "create", "offsite-test"]);
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let (Some(key_id), Some(secret)) = (field("Key ID:"), field("Secret key:")) else {
            g.fail(&format!(
                "no Key ID / Secret key line in `key create`: {out}"
            ));
        };
        g.key_id = key_id;
        g.secret = secret;
        g.cli_ok(&["key", "allow", "--create-bucket", &g.key_id]);
        g.wait_s3();
        g
    }

    /// This server as an S3 client sees it.
    pub fn side(&self) -> Side {
        Side {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            key_id: self.key_id.clone(),
            secret: self.secret.clone(),
            garage_config: self.config.clone(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// A crash: SIGKILL, then wait for the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A clean shutdown: SIGTERM, wait up to 10 s, then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if c.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Starts the stopped server again: same config, data dir, ports and keys. Returns when
    /// the S3 port accepts connections.
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "garage {} still runs",
            self.dir.display()
        );
        self.launch();
        self.wait_s3();
    }

    /// The last lines of the server log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "garage {}: {what}\n--- server.log ---\n{}",
            self.dir.display(),
            self.log_tail()
        )
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(&super::rig().garage_bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| self.fail(&format!("cannot run garage: {e}")))
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        if !out.status.success() {
            self.fail(&format!(
                "garage {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Spawns `garage server` (output appended to server.log, nothing inherited) and waits
    /// until its RPC answers. Returns the node id.
    fn launch(&mut self) -> String {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&super::rig().garage_bin)
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| self.fail(&format!("cannot start garage server: {e}")));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if !self.is_running() {
                self.child = None;
                self.fail("server exited during start-up");
            }
            // `node id` only reads the key file; `status` needs the RPC port.
            let id = self.cli(&["node", "id", "-q"]);
            if id.status.success() && self.cli(&["status"]).status.success() {
                let id = String::from_utf8_lossy(&id.stdout);
                let id = id.trim().split('@').next().unwrap_or("").to_string();
                if !id.is_empty() {
                    return id;
                }
            }
            if Instant::now() > deadline {
                self.fail("RPC not answering after 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_s3(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.s3_port)).is_err() {
            if Instant::now() > deadline || !self.is_running() {
                self.fail(&format!(
                    "S3 port {} not accepting connections",
                    self.s3_port
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Raw rclone against any two sides

/// The tests' independent view of two storages, as remotes `primary:` and `secondary:`, like
/// [`super::rclone`] does for the rig (scrubbed environment: rclone 1.60 breaks with
/// `AWS_CA_BUNDLE` set).
#[derive(Debug, Clone)]
pub struct Storage {
    pub primary: Side,
    pub secondary: Side,
}

impl Storage {
    pub fn new(primary: Side, secondary: Side) -> Storage {
        Storage { primary, secondary }
    }

    /// The rig's two servers (`OFFSITE_TEST_*`).
    pub fn rig() -> Storage {
        let r = super::rig();
        Storage::new(r.primary.clone(), r.secondary.clone())
    }

    fn conf(&self) -> String {
        let mut conf = String::new();
        for (name, s) in [("primary", &self.primary), ("secondary", &self.secondary)] {
            write!(
                conf,
                "[{name}]\ntype = s3\nprovider = Other\nenv_auth = false\naccess_key_id = {}\n\
                 secret_access_key = {}\nendpoint = {}\nregion = {}\nforce_path_style = true\n\n",
                s.key_id, s.secret, s.endpoint, s.region
            )
            .unwrap();
        }
        conf
    }

    /// Runs the rig's rclone with this storage's remotes; `stdin` is fed when given. Does not
    /// check the exit status.
    pub fn rclone_with(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let dir = super::tempdir();
        let conf = dir.path().join("rclone.conf");
        super::write_private(&conf, self.conf().as_bytes());
        let mut cmd = Command::new(&super::rig().rclone);
        cmd.arg("--config").arg(&conf).args(args);
        cmd.env_clear();
        for keep in ["PATH", "HOME"] {
            if let Some(v) = std::env::var_os(keep) {
                cmd.env(keep, v);
            }
        }
        cmd.current_dir(dir.path())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run rclone");
        let writer = stdin.map(|b| {
            let mut pipe = child.stdin.take().unwrap();
            let data = b.to_vec();
            std::thread::spawn(move || pipe.write_all(&data))
        });
        let out = child.wait_with_output().expect("wait for rclone");
        if let Some(w) = writer {
            w.join().unwrap().expect("write rclone stdin");
        }
        out
    }

    pub fn rclone(&self, args: &[&str]) -> Output {
        self.rclone_with(args, None)
    }

    /// Panics with rclone's stderr unless it exits 0. Returns stdout.
    pub fn ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.rclone(args);
        assert!(
            out.status.success(),
            "rclone {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    pub fn mkdir(&self, remote_path: &str) {
        self.ok(&["mkdir", remote_path]);
    }

    pub fn put(&self, remote_path: &str, bytes: &[u8]) {
        let out = self.rclone_with(&["rcat", remote_path], Some(bytes));
        assert!(
            out.status.success(),
            "rclone rcat {remote_path} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn delete(&self, remote_path: &str) {
        self.ok(&["deletefile", remote_path]);
    }

    /// Every object under `remote_path` (recursive) as (relative path, size), sorted; empty
    /// when the path does not exist.
    pub fn ls(&self, remote_path: &str) -> Vec<(String, u64)> {
        let out = self.rclone(&["lsjson", "-R", "--files-only", remote_path]);
        if out.status.code() == Some(3) {
            return vec![];
        }
        assert!(
            out.status.success(),
            "lsjson {remote_path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        super::parse_lsjson(&out.stdout)
    }

    /// Fresh buckets: `n_sources` on `primary:`, one destination on `secondary:`.
    pub fn bucket_pair(&self, n_sources: usize) -> Buckets {
        let sources: Vec<String> = (0..n_sources).map(|_| super::unique("src")).collect();
        let destination = super::unique("dst");
        for s in &sources {
            self.mkdir(&format!("primary:{s}"));
        }
        self.mkdir(&format!("secondary:{destination}"));
        Buckets {
            sources,
            destination,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Policies for any two sides

/// Like [`super::s3_policy_with`] (same secret files, same default sections, same override
/// rules), with `source` and `destination` on the given sides instead of the rig's.
pub fn policy_with(
    dir: &Path,
    source: &Side,
    destination: &Side,
    b: &Buckets,
    overrides: &str,
) -> PathBuf {
    let yaml = policy_yaml(dir, source, destination, b, overrides);
    let path = dir.join(super::POLICY_FILE);
    std::fs::write(&path, yaml).unwrap();
    path
}

/// The text [`policy_with`] writes (secret files are written as a side effect).
pub fn policy_yaml(
    dir: &Path,
    source: &Side,
    destination: &Side,
    b: &Buckets,
    overrides: &str,
) -> String {
    use super::{file_ref, write_secret, yaml_str};
    let secret = |name: &str, value: &str| file_ref(&write_secret(dir, name, value));
    let keep_or_new = |name: &str| {
        let p = dir.join(name);
        match std::fs::read_to_string(&p) {
            Ok(v) if !v.is_empty() => file_ref(&p),
            _ => secret(name, &super::random_secret(40)),
        }
    };
    let password = keep_or_new(super::PASSWORD_FILE);
    let salt = keep_or_new(super::SALT_FILE);
    let buckets: String = b
        .sources
        .iter()
        .map(|s| format!("  - {}\n", yaml_str(s)))
        .collect();
    let mut sections: Vec<(String, String)> = vec![
        ("version".into(), "version: 1\n".into()),
        ("name".into(), format!("name: {}\n", super::unique("fault"))),
        (
            "source".into(),
            format!(
                "source:\n  type: s3\n  endpoint: {}\n  region: {}\n  access_key_id: {}\n  \
                 secret_access_key: {}\n  options: {{force_path_style: true}}\n",
                yaml_str(&source.endpoint),
                yaml_str(&source.region),
                secret(super::PRIMARY_KEY_ID_FILE, &source.key_id),
                secret(super::PRIMARY_SECRET_FILE, &source.secret),
            ),
        ),
        (
            "destination".into(),
            format!(
                "destination:\n  type: s3\n  endpoint: {}\n  region: {}\n  bucket: {}\n  \
                 prefix: replica\n  access_key_id: {}\n  secret_access_key: {}\n  \
                 options: {{force_path_style: true}}\n",
                yaml_str(&destination.endpoint),
                yaml_str(&destination.region),
                yaml_str(&b.destination),
                secret(super::SECONDARY_KEY_ID_FILE, &destination.key_id),
                secret(super::SECONDARY_SECRET_FILE, &destination.secret),
            ),
        ),
        (
            "encryption".into(),
            format!("encryption:\n  password: {password}\n  salt: {salt}\n"),
        ),
        ("buckets".into(), format!("buckets:\n{buckets}")),
        (
            "compliance".into(),
            "compliance: {require_tls: false}\n".into(),
        ),
    ];
    for (key, text) in super::top_level_sections(overrides) {
        match sections.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = text,
            None => sections.push((key, text)),
        }
    }
    sections.into_iter().map(|(_, t)| t).collect()
}
