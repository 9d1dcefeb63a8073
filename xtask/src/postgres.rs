//! A throwaway PostgreSQL cluster: a private directory under /tmp, a Unix socket in
//! it (so clusters never compete for a port), fsync off, removed on drop.

use crate::Result;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A running cluster, stopped and deleted when dropped.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres_user: bool,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn apt_install(packages: &[&str]) -> Result {
    let quiet = |cmd: &mut Command| {
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("apt-get: {e}"))
    };
    eprintln!("xtask: installing {} with apt-get", packages.join(" "));
    quiet(Command::new("apt-get").arg("update"))?;
    let status = quiet(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(packages),
    )?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("apt-get install {} failed", packages.join(" ")))
    }
}

/// The directory of the newest installed PostgreSQL server binaries.
fn find_server_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The PostgreSQL client library that diesel links against must be present
/// before anything is compiled.
pub fn ensure_libpq() -> Result {
    let present = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .any(|d| Path::new(d).join("libpq.so").exists());
    if present {
        return Ok(());
    }
    if is_root() {
        apt_install(&["libpq-dev"])
    } else {
        Err("libpq (the PostgreSQL client library) is missing: install Debian's `libpq-dev`".into())
    }
}

impl Cluster {
    pub fn start() -> Result<Cluster> {
        let bin = match find_server_bin() {
            Some(bin) => bin,
            None if is_root() => {
                apt_install(&["postgresql"])?;
                find_server_bin().ok_or("postgresql installed but no initdb found")?
            }
            None => {
                return Err(
                    "no PostgreSQL server binaries under /usr/lib/postgresql: install \
                            Debian's `postgresql` package (or run as root to have it installed)"
                        .into(),
                )
            }
        };
        let as_postgres_user = is_root();
        let dir = make_dir()?;
        let cluster = Cluster {
            dir,
            bin,
            as_postgres_user,
        };
        let started = Instant::now();
        cluster.pg(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let options = format!(
            "-k {} -c listen_addresses='' -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=400",
            cluster.dir.display()
        );
        let log = cluster.dir.join("server.log");
        cluster.pg(
            "pg_ctl",
            &[
                "-D",
                &cluster.data(),
                "-l",
                &log.to_string_lossy(),
                "-w",
                "-o",
                &options,
                "start",
            ],
        )?;
        eprintln!(
            "xtask: PostgreSQL running in {} (started in {:.1}s)",
            cluster.dir.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(cluster)
    }

    /// URL of database `db` on this cluster, over its Unix socket.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@/{db}?host={}", self.dir.display())
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn pg(&self, tool: &str, args: &[&str]) -> Result {
        let program = self.bin.join(tool);
        let mut cmd = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let output = cmd
            .args(args)
            .current_dir(&self.dir)
            .output()
            .map_err(|e| format!("{tool}: could not start: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            Err(format!(
                "{tool} failed ({}):\n{}{}\n{log}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }
}

fn make_dir() -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    // Short: the socket path must stay under 107 bytes.
    let dir = PathBuf::from(format!("/tmp/hs-pg-{}-{nanos:x}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    if is_root() {
        let status = Command::new("chown")
            .arg("postgres:")
            .arg(&dir)
            .status()
            .map_err(|e| format!("chown: {e}"))?;
        if !status.success() {
            return Err(format!("chown postgres {} failed", dir.display()));
        }
    }
    Ok(dir)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.pg("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        // pg_ctl returns when the postmaster has gone; wait for its pid file anyway
        // before deleting the directory under it.
        let pid = Path::new(&data).join("postmaster.pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("xtask: could not remove {}: {e}", self.dir.display());
        }
    }
}
