//! `hs-main serve` and `hs-worker` run from one configuration file and
//! nothing else: the database, the listen addresses, the API token from
//! `api_token_file`, JSON logs, and the worker's `worker:` section (on
//! PostgreSQL, the engine workers need).

use e2e_tests::{encode, free_port, tempdir, TempDir, ROOM};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;

storage_core::engine_tests!(serve_and_a_worker_run_from_one_config_file);

/// A binary started with `--config` only; killed when dropped.
struct Running {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

fn run(program: &str, config: &str, port: u16, log: std::path::PathBuf) -> Running {
    let child = Command::new(e2e_tests::binary(program))
        .args(["--config", config])
        .args(if program == "hs-main" {
            vec!["serve"]
        } else {
            vec![]
        })
        .env_remove("HS_API_TOKEN")
        .env_remove("HS_DATABASE")
        .env_remove("HS_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let running = Running { child, log };
    let deadline = Instant::now() + Duration::from_secs(30);
    let health = format!("http://127.0.0.1:{port}/_hs/v1/health");
    while ureq::get(&health).call().is_err() {
        assert!(
            Instant::now() < deadline,
            "{program} did not come up on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    running
}

/// The status of GET `path` with `token`.
fn status(port: u16, path: &str, token: &str) -> u16 {
    match ureq::get(&format!("http://127.0.0.1:{port}{path}"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("GET {path}: {e}"),
    }
}

fn serve_and_a_worker_run_from_one_config_file(db: &TestDb) {
    let dir = TempDir(tempdir("config-file"));
    let token = dir.0.join("api-token");
    std::fs::write(&token, "token-from-file\n").unwrap();
    let (main_port, worker_port) = (free_port(), free_port());
    let config = dir.0.join("hs.yaml");
    std::fs::write(
        &config,
        format!(
            "database: {:?}\nlisten: 127.0.0.1:{main_port}\napi_token_file: {:?}\n\
             log:\n  format: json\ncaches:\n  global_factor: 0.5\n\
             worker:\n  main: http://127.0.0.1:{main_port}\n  name: worker-from-config\n  \
             listen: 127.0.0.1:{worker_port}\n",
            db.url(),
            token.display().to_string(),
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let main = run("hs-main", config, main_port, dir.0.join("main.log"));
    let state = format!("/_hs/v1/rooms/{}/state", encode(ROOM));
    // The token from the file opens the API (an unknown room: 404); another does not.
    assert_eq!(status(main_port, &state, "token-from-file"), 404);
    assert_eq!(status(main_port, &state, "some-other-token"), 401);
    let text = std::fs::read_to_string(&main.log).unwrap();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log.format json: a line is not JSON ({e}): {line}"));
        assert!(v["context"].is_string(), "{line}");
    }
    if db.engine() != "postgres" {
        return;
    }
    let worker = run("hs-worker", config, worker_port, dir.0.join("worker.log"));
    assert_eq!(status(worker_port, &state, "token-from-file"), 404);
    assert_eq!(status(worker_port, &state, "some-other-token"), 401);
    let text = std::fs::read_to_string(&worker.log).unwrap();
    assert!(
        text.contains(r#""context":"worker-from-config""#),
        "the worker's name and JSON logs come from the file: {text}"
    );
}
